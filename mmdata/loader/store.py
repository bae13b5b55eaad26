"""Read access to a build's sidecars from a loader worker: per-shard key → (row, id) tables and
the stored embedding rows (``embeddings/<modality>/<shard>.npy``, aligned with the shard's
written samples). Local files are memory-mapped; remote ones are fetched whole and kept in a
small LRU cache.
"""
from __future__ import annotations

import io
import json
from collections import OrderedDict
from typing import Optional

import numpy as np

from mmdata.arrow import parquet_table
from mmdata.errors import UserError
from mmdata.storage import OutputDir

_REMOTE_CACHE = 64  # embedding files kept per modality when the output is not local


def embedded_modalities(out: OutputDir) -> list[str]:
    """Modalities with stored embeddings, from the manifest (``embeddings.modalities``)."""
    if not out.exists("manifest.json"):
        return []
    manifest = json.loads(out.read_bytes("manifest.json"))
    return list((manifest.get("embeddings") or {}).get("modalities") or [])


def shard_rows(out: OutputDir, shard: str) -> dict[str, tuple[int, int]]:
    """key → (row, id) of the shard's written samples, from ``shards/<shard>.parquet``."""
    table = parquet_table(out.read_bytes(f"shards/{shard}.parquet"), columns=["key", "id", "status", "row"])
    return {r["key"]: (r["row"], r["id"]) for r in table.to_pylist() if r["status"] == "written"}


class EmbeddingStore:
    """Rows of ``embeddings/<modality>/<shard>.npy`` as float32, opened lazily (once per worker)."""

    def __init__(self, out: OutputDir, modality: str):
        self.out = out
        self.modality = modality
        self._arrays: "OrderedDict[str, np.ndarray]" = OrderedDict()
        self.dim: Optional[int] = None

    def array(self, shard: str) -> np.ndarray:
        arr = self._arrays.get(shard)
        if arr is None:
            rel = f"embeddings/{self.modality}/{shard}.npy"
            try:
                if self.out.local:
                    arr = np.load(self.out.path(rel), mmap_mode="r")
                else:
                    arr = np.load(io.BytesIO(self.out.read_bytes(rel)))
            except FileNotFoundError:
                raise UserError(f"{self.out.url} has no {rel}: the build did not embed {self.modality!r}") from None
            self._arrays[shard] = arr
            self.dim = arr.shape[1]
            if not self.out.local and len(self._arrays) > _REMOTE_CACHE:
                self._arrays.popitem(last=False)
        else:
            self._arrays.move_to_end(shard)
        return arr

    def rows(self, shard: str, rows) -> np.ndarray:
        return np.asarray(self.array(shard)[rows], dtype=np.float32)

    def __getstate__(self) -> dict:
        # Workers open their own maps; never ship arrays through pickle.
        return {**self.__dict__, "_arrays": OrderedDict()}
