"""Caption tokenisation with open_clip's tokenizer for the configured model (``{key}.tokens.npy``)."""
from __future__ import annotations

import functools

import numpy as np

from mmdata.errors import UserError
from mmdata.writers.npy import npy_bytes


@functools.lru_cache(maxsize=4)
def get_tokenizer(model: str):
    """open_clip's tokenizer for ``model``, loaded once per process."""
    import open_clip

    try:
        return open_clip.get_tokenizer(model)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot load the tokenizer of {model}: {str(exc).splitlines()[0]}") from None


def tokenize_npy(tokenizer, captions: list[str]) -> list[bytes]:
    """One ``.npy`` (int32, the model's context length) per caption."""
    ids = tokenizer(captions).numpy().astype(np.int32)
    return [npy_bytes(row) for row in ids]
