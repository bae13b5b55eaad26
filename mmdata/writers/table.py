"""Parquet writing with a fixed schema (same rows → same bytes)."""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq


def table_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    """``rows`` as parquet bytes with exactly ``schema`` (missing fields are null)."""
    table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()
