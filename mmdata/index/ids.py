"""``index/ids.parquet``: written from the shards (``write_ids``), and held as arrays: id → row, key → row, and the fields of the few rows asked for.

The Retriever and the loader's neighbour lookup both open it. Its rows stay columnar (numpy arrays
sorted by id, the strings in Arrow buffers); Python objects are made only for the rows a caller
asks for, so the Python heap does not grow with the corpus.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmdata.arrow import parquet_table, string_scalar
from mmdata.layout import IDS_FILE, embedding_file, shard_files
from mmdata.records import Unit
from mmdata.storage import OutputDir

IDS_SCHEMA = pa.schema([
    pa.field("id", pa.int64(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("row", pa.int32(), nullable=False),
    pa.field("caption", pa.string()),
])


ROW_GROUP_ROWS = 1 << 17  # rows per row group of ids.parquet: what its writer holds at most, beyond one shard


def _written(out: OutputDir, name: str, columns: list[str]) -> pa.Table:
    """``columns`` of unit ``name``'s written samples, in row order."""
    table = parquet_table(out.read_bytes(shard_files(name)["parquet"]), columns=[*columns, "status"])
    return table.filter(pc.equal(table.column("status"), string_scalar("written"))).select(columns)


def written_table(out: OutputDir, name: str) -> pa.Table:
    """Unit ``name``'s rows of ids.parquet (``IDS_SCHEMA``): id, key, shard, row, caption of its
    written samples, in row order."""
    table = _written(out, name, ["id", "key", "row", "caption"])
    columns = {"id": table.column("id"), "key": table.column("key"), "shard": pa.repeat(f"{name}.tar", table.num_rows),
               "row": table.column("row"), "caption": table.column("caption")}
    return pa.table({f.name: columns[f.name].cast(f.type) for f in IDS_SCHEMA}, schema=IDS_SCHEMA)


def write_ids(out: OutputDir, units: list[Unit]) -> dict[str, np.ndarray]:
    """Write ``index/ids.parquet`` (the written samples, in shard then row order) one shard at a time;
    return each unit's written ids, in row order (the rows of its embedding files).

    Row groups hold ``ROW_GROUP_ROWS`` rows (the last one the rest), so the bytes depend only on the
    rows, not on how they were read: the same shards give the same file on every engine.
    """
    ids: dict[str, np.ndarray] = {}
    with out.atomic_open("index/ids.parquet") as fh, pq.ParquetWriter(fh, IDS_SCHEMA, compression="zstd") as writer:
        pending: list[pa.Table] = []
        n_pending, n_written = 0, 0
        for unit in units:
            table = written_table(out, unit.name)
            ids[unit.name] = np.asarray(table.column("id").to_numpy(), dtype=np.int64)
            pending.append(table)
            n_pending += table.num_rows
            while n_pending >= ROW_GROUP_ROWS:
                buffered = pa.concat_tables(pending)
                writer.write_table(buffered.slice(0, ROW_GROUP_ROWS).combine_chunks())
                rest = buffered.slice(ROW_GROUP_ROWS)
                pending, n_pending, n_written = [rest], rest.num_rows, n_written + ROW_GROUP_ROWS
        if n_pending or not n_written:  # the rest; an empty corpus still gets one (empty) row group
            writer.write_table(pa.concat_tables(pending).combine_chunks() if pending else IDS_SCHEMA.empty_table())
    return ids


def written_ids(out: OutputDir, name: str) -> np.ndarray:
    """The ids of unit ``name``'s written samples, in row order (the rows of its embedding files)."""
    return np.asarray(_written(out, name, ["id"]).column("id").to_numpy(), dtype=np.int64)


def unit_source(out: OutputDir, modality: str, name: str, ids: np.ndarray, scratch: str):
    """Unit ``name``'s ``modality`` embeddings as an EmbeddingSource of a local file, or None if it has none.

    Remote files are fetched into ``scratch``; zero rows (samples without the modality) are dropped
    into a scratch copy.
    """
    from mmdata.index import EmbeddingSource

    if not len(ids):
        return None
    rel = embedding_file(modality, name)
    if out.local:
        path = out.path(rel)
    else:
        path = os.path.join(scratch, rel.replace("/", "_"))
        out.fs.get_file(out.path(rel), path)
    rows = np.load(path, mmap_mode="r")
    present = np.flatnonzero(np.any(rows != 0, axis=1))
    if len(present) < len(ids):  # samples without this modality: index only the others
        path = os.path.join(scratch, f"{modality}_{name}.npy")
        np.save(path, np.asarray(rows[present]))
        ids = ids[present]
    return EmbeddingSource(path, ids) if len(ids) else None


class IdTable:
    """id → (shard, row, key[, caption]) over ``index/ids.parquet``, sorted by id (no per-row dicts).

    Positions are indexes into ``ids`` (the sorted ids), ``shard`` (codes into ``shard_names``),
    ``row`` and ``keys``; ``captions=True`` also keeps the captions, for ``records``.
    """

    def __init__(self, out: OutputDir, captions: bool = False):
        columns = ["id", "key", "shard", "row"] + (["caption"] if captions else [])
        table = parquet_table(out.read_bytes(IDS_FILE), columns=columns)
        order = np.argsort(np.asarray(table.column("id").to_numpy(), dtype=np.int64), kind="stable")
        table = table.take(pa.array(order))
        del order
        self.ids = np.asarray(table.column("id").to_numpy(), dtype=np.int64)
        shard = table.column("shard")
        # few distinct values (one per shard): ordered by shard name, coded per row
        self.shard_files = sorted(pc.unique(shard).to_pylist(), key=lambda s: s[:-4])
        self.shard_names = [s[:-4] for s in self.shard_files]
        self.shard = np.asarray(pc.index_in(shard, value_set=pa.array(self.shard_files, pa.string())).to_numpy(),
                                dtype=np.int32)
        self.row = np.asarray(table.column("row").to_numpy(), dtype=np.int64)
        self.keys = table.column("key")  # Arrow strings
        self.captions = table.column("caption") if captions else None

    def __len__(self) -> int:
        return len(self.ids)

    def locate(self, ids: np.ndarray) -> np.ndarray:
        """Positions of ``ids`` in the table (ids must be present)."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids)
        found = pos < len(self.ids)
        found[found] = self.ids[pos[found]] == ids[found]
        if not found.all():
            raise KeyError("ids not in index/ids.parquet")
        return pos

    def find_key(self, key: str) -> Optional[int]:
        """The position of ``key``, or None (one scan of the Arrow key column; keys are unique)."""
        if not isinstance(key, str) or not len(self.ids):
            return None
        pos = pc.index(self.keys, pa.scalar(key, pa.string())).as_py()
        return None if pos < 0 else pos

    def keys_at(self, pos: np.ndarray) -> list[str]:
        """The keys at positions ``pos``."""
        return self.keys.take(pa.array(np.asarray(pos, dtype=np.int64))).to_pylist()

    def records(self, pos: np.ndarray) -> list[dict]:
        """``{id, key, shard, row, caption}`` of the rows at ``pos``, as in ids.parquet (shard: ``NNNNN.tar``).

        Needs ``captions=True``."""
        if self.captions is None:
            raise ValueError("this IdTable was opened without captions")
        pos = np.asarray(pos, dtype=np.int64)
        taken = pa.array(pos)
        return [{"id": i, "key": k, "shard": self.shard_files[s], "row": r, "caption": c}
                for i, k, s, r, c in zip(self.ids[pos].tolist(), self.keys.take(taken).to_pylist(),
                                         self.shard[pos].tolist(), self.row[pos].tolist(),
                                         self.captions.take(taken).to_pylist())]
