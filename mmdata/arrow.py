"""Arrow to numpy and Python, and Python to Arrow, without pyarrow importing pandas.

pyarrow imports pandas (~0.4 to 1 s of CPU) the first time it converts through its pandas code:
``to_numpy``, ``pq.read_table`` (through ``pyarrow.dataset``), a Python value turned into an Arrow
scalar in the build driver. The build driver, planning, the workers and a training job's loader never
need pandas: they use these instead (``tests/test_startup_imports.py`` checks the driver and workers).
"""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa


def parquet_table(data: bytes, columns: list[str] | None = None, use_threads: bool = True) -> pa.Table:
    """One parquet file's bytes as a table (only ``columns``, when given). ``pq.read_table`` would
    do the same through ``pyarrow.dataset``, whose import imports pandas (~1 s of CPU) in a process
    that never needs it: the build driver, a worker, a training job's loader."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(io.BytesIO(data)).read(columns=columns, use_threads=use_threads)


def string_scalar(text: str) -> pa.StringScalar:
    """``pa.scalar(text, pa.string())`` built from its bytes: converting a Python value makes
    pyarrow's C++ side import pandas (~1 s of CPU) to ask whether it is a pandas null."""
    data = text.encode("utf-8")
    offsets = pa.py_buffer(np.array([0, len(data)], dtype=np.int32))
    return pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(data)])[0]


def numpy_values(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """``column.to_numpy(zero_copy_only=False)``, read from the Arrow buffers for numbers and booleans
    without nulls: ``to_numpy`` converts through pyarrow's pandas code, which imports pandas (~0.4 to 1 s
    of CPU) in processes that never need it (the build driver, planning, workers). Other columns go
    through ``to_numpy``. Always a copy."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    t = arr.type
    if arr.null_count == 0 and (pa.types.is_integer(t) or pa.types.is_float32(t) or pa.types.is_float64(t)):
        kind = "f" if pa.types.is_floating(t) else "u" if pa.types.is_unsigned_integer(t) else "i"
        dtype = np.dtype(f"<{kind}{t.bit_width // 8}")
        if not len(arr):
            return np.zeros(0, dtype=dtype)
        return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr), offset=arr.offset * dtype.itemsize).copy()
    if arr.null_count == 0 and pa.types.is_boolean(t):
        if not len(arr):
            return np.zeros(0, dtype=bool)
        bits = np.unpackbits(np.frombuffer(arr.buffers()[1], dtype=np.uint8), bitorder="little")
        return bits[arr.offset: arr.offset + len(arr)].astype(bool)
    return arr.to_numpy(zero_copy_only=False)


def int64_values(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An integer column without nulls as int64 (``numpy_values``: no pandas import)."""
    column = column.cast(pa.int64())
    if column.null_count:
        raise ValueError("int64_values: the column has nulls")
    return numpy_values(column)


def column_values(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A column's values as ``to_numpy(zero_copy_only=False)`` gives them, without importing pandas:
    numbers with nulls (and all floats) as float64 with NaN, other integers in their own type, booleans
    without nulls as bool, anything else as objects (None for null). Through Python values: for
    bounded columns (a report's sample), not for whole corpora."""
    values, t = column.to_pylist(), column.type
    if pa.types.is_floating(t) or ((pa.types.is_integer(t)) and column.null_count):
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    if pa.types.is_integer(t):
        return np.array(values, dtype=np.dtype(str(t)))
    if pa.types.is_boolean(t) and not column.null_count:
        return np.array(values, dtype=bool)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
