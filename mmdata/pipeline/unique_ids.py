"""Every written sample's id (and so its key) is unique across all shards of an output.

Ids are read shard by shard (two columns of each ``NNNNN.parquet``) into one int64 array, sorted,
and compared with their neighbours: 8 bytes per written sample, whatever the corpus.
"""
from __future__ import annotations

import numpy as np
import pyarrow.compute as pc

from mmdata.arrow import int64_values, parquet_table, string_scalar
from mmdata.storage import OutputDir


def written_ids(out: OutputDir, shard: str) -> np.ndarray:
    """The ids of the written rows of ``shards/<shard>.parquet`` (``shard`` without extension)."""
    table = parquet_table(out.read_bytes(f"shards/{shard}.parquet"), columns=["id", "status"],
                          use_threads=False)
    written = table.filter(pc.equal(table.column("status"), string_scalar("written")))
    return int64_values(written.column("id"))


def duplicate_ids(out: OutputDir, shards: list[str], limit: int = 5) -> list[str]:
    """One line per id written more than once (at most ``limit``, then a count), naming its key and shards."""
    ids, owner = [], []
    for i, shard in enumerate(shards):
        got = written_ids(out, shard)
        ids.append(got)
        owner.append(np.full(len(got), i, dtype=np.int32))
    if not ids:
        return []
    all_ids, all_owner = np.concatenate(ids), np.concatenate(owner)
    order = np.argsort(all_ids, kind="stable")
    sorted_ids = all_ids[order]
    dup = np.unique(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]])
    if not len(dup):
        return []
    lines = []
    for value in dup[:limit]:
        where = sorted({shards[j] for j in all_owner[all_ids == value]})
        keys = _keys_of(out, where, int(value))
        lines.append(f"id {int(value)} (key {', '.join(sorted(keys))}) is written more than once, in shards "
                     f"{', '.join(where)}")
    if len(dup) > limit:
        lines.append(f"... and {len(dup) - limit} more duplicate ids")
    return lines


def _keys_of(out: OutputDir, shards: list[str], value: int) -> set[str]:
    keys: set[str] = set()
    for shard in shards:
        table = parquet_table(out.read_bytes(f"shards/{shard}.parquet"), columns=["id", "key", "status"],
                              use_threads=False)
        for row in table.to_pylist():
            if row["id"] == value and row["status"] == "written":
                keys.add(row["key"])
    return keys
