"""Embedding rows of a build as curation reads them: candidates spread over per-shard ``.npy`` files.

A ``VectorSet`` is a list of parts (one per input shard: its embedding file, or for the ``pair``
modality its image and text files) and, per candidate, its part and row. Rows are read from
memory-mapped files a part at a time, so reading a subset costs that subset's memory.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from mmdata.storage import OutputDir


@dataclass
class VectorSet:
    """``parts[p]``: {"url": build, "rels": [npy files]}; candidate ``i`` is row ``rows[i]`` of part ``part[i]``.

    Two files in a part are the image and text embeddings of a pair: their rows are concatenated and
    scaled by 1/sqrt(2), so the pair's cosine is the mean of the image and the text cosines.
    """

    parts: list[dict]
    part: np.ndarray
    rows: np.ndarray
    _dim: int | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def dim(self) -> int:
        if not self.parts:
            return 0
        if self._dim is None:
            self._dim = sum(open_rows(self.parts[0]["url"], rel).shape[1] for rel in self.parts[0]["rels"])
        return self._dim

    def take(self, idx: np.ndarray) -> np.ndarray:
        """float32 vectors of candidates ``idx`` (sorted or not), in the order of ``idx``."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.zeros((len(idx), self.dim()), dtype=np.float32)
        if not len(idx):
            return out
        parts = self.part[idx]
        for p in np.unique(parts):
            where = np.flatnonzero(parts == p)
            rows = self.rows[idx[where]]
            order = np.argsort(rows, kind="stable")
            out[where[order]] = self.read_part(int(p), rows[order])
        return out

    def read_part(self, p: int, rows: np.ndarray) -> np.ndarray:
        spec = self.parts[p]
        blocks = [np.asarray(open_rows(spec["url"], rel)[rows], dtype=np.float32) for rel in spec["rels"]]
        vec = np.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]
        if len(blocks) > 1:
            vec /= np.sqrt(len(blocks))
        return vec

    def chunks(self, size: int = 65536):
        """(candidate indices, vectors) in candidate order, ``size`` rows at a time."""
        for start in range(0, len(self), size):
            idx = np.arange(start, min(start + size, len(self)))
            yield idx, self.take(idx)

    def save(self, out: OutputDir, folder: str) -> None:
        out.write_bytes(f"{folder}/parts.json", json.dumps(self.parts).encode())
        out.write_bytes(f"{folder}/index.npy", _npy(np.stack([self.part.astype(np.int64), self.rows.astype(np.int64)])))

    @classmethod
    def load(cls, out: OutputDir, folder: str) -> "VectorSet":
        parts = json.loads(out.read_bytes(f"{folder}/parts.json"))
        index = np.load(io.BytesIO(out.read_bytes(f"{folder}/index.npy")), allow_pickle=False)
        return cls(parts, index[0], index[1])


_COPIES: dict[tuple[str, str], str] = {}


def open_rows(url: str, rel: str) -> np.ndarray:
    """A memory-mapped embedding file (of a remote build: a local copy, fetched once per process).
    Callers copy the rows they need and drop the map, so the pages read do not stay resident."""
    out = OutputDir(url)
    if out.local:
        path = out.path(rel)
    else:
        if (url, rel) not in _COPIES:
            _COPIES[(url, rel)] = out.local_path(rel)
        path = _COPIES[(url, rel)]
    return np.load(path, mmap_mode="r", allow_pickle=False)


def open_scratch(url: str, rel: str) -> np.ndarray:
    """A scratch array of a curation, memory-mapped on a local output; on a remote one read whole
    each time (scratch files are rewritten between rounds: no cached copy)."""
    out = OutputDir(url)
    if out.local:
        return np.load(out.path(rel), mmap_mode="r", allow_pickle=False)
    return load_npy(out, rel)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def load_npy(out: OutputDir, rel: str) -> np.ndarray:
    return np.load(io.BytesIO(out.read_bytes(rel)), allow_pickle=False)


def save_npy(out: OutputDir, rel: str, array: np.ndarray) -> None:
    out.write_bytes(rel, _npy(array))
