"""``.npy`` bytes for tar members and embedding files (no pickle; same array → same bytes)."""
from __future__ import annotations

import io
from typing import Optional

import numpy as np


def npy_bytes(array: np.ndarray, dtype: Optional[str] = None) -> bytes:
    """``array`` (cast to ``dtype`` when given) as the bytes of an ``.npy`` file."""
    if dtype is not None:
        array = array.astype(dtype)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()
