"""``index/ids.parquet`` held as arrays: id → row, key → row, and the fields of the few rows asked for.

The Retriever and the loader's neighbour lookup both open it. Its rows stay columnar (numpy arrays
sorted by id, the strings in Arrow buffers); Python objects are made only for the rows a caller
asks for, so the Python heap does not grow with the corpus.
"""
from __future__ import annotations

import io
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmdata.storage import OutputDir

IDS_FILE = "index/ids.parquet"


class IdTable:
    """id → (shard, row, key[, caption]) over ``index/ids.parquet``, sorted by id (no per-row dicts).

    Positions are indexes into ``ids`` (the sorted ids), ``shard`` (codes into ``shard_names``),
    ``row`` and ``keys``; ``captions=True`` also keeps the captions, for ``records``.
    """

    def __init__(self, out: OutputDir, captions: bool = False):
        columns = ["id", "key", "shard", "row"] + (["caption"] if captions else [])
        table = pq.read_table(io.BytesIO(out.read_bytes(IDS_FILE)), columns=columns)
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
