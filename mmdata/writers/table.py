"""Parquet writing with a fixed schema (same rows → same bytes)."""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq


def table_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    """``rows`` as parquet bytes with exactly ``schema`` (missing fields are null)."""
    return arrow_table_bytes(pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema))


def arrow_table_bytes(table: pa.Table) -> bytes:
    """An Arrow table as parquet bytes, written as ``table_bytes`` writes rows (one chunk per column:
    the same values give the same bytes however the table was assembled)."""
    table = table.combine_chunks()
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()
