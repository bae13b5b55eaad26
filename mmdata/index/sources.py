"""Embedding files as the index layer reads them: validated up front, then streamed in chunks.

A source is one ``.npy`` file (float16 or float32, one L2-normalised row per sample) and the int64
ids of its rows. Files are opened with ``mmap_mode="r"`` and one chunk at a time is converted to
float32, so reading costs one chunk of memory whatever the corpus size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

CHUNK_BYTES = 64 * 2**20  # float32 bytes per chunk handed to faiss
ACCEPTED_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


@dataclass(eq=False)
class EmbeddingSource:
    """One embeddings file and the stable int64 ids of its rows (never row positions)."""

    path: str
    ids: np.ndarray

    def __post_init__(self) -> None:
        self.path = str(self.path)
        ids = np.asarray(self.ids)
        if ids.dtype != np.int64:
            raise TypeError(f"{self.path}: ids must be int64, got {ids.dtype}")
        if ids.ndim != 1:
            raise ValueError(f"{self.path}: ids must be 1-D, got shape {ids.shape}")
        self.ids = ids


@dataclass(eq=False)
class Corpus:
    """Validated sources: their row counts, the common dimension and global row offsets."""

    sources: list[EmbeddingSource]
    rows: list[int]
    dim: int
    offsets: np.ndarray = field(repr=False)  # offsets[i] = first global row of sources[i]

    @property
    def n(self) -> int:
        return int(self.offsets[-1])


def _npy_header(path: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy file without mapping it (empty arrays cannot be mapped)."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    return shape, dtype


def validate_sources(
    sources: list[EmbeddingSource], *, check_unique_ids: bool = True, allow_empty: bool = False
) -> Corpus:
    """Check every file before any work starts: shape, dtype, ids length, common dimension.

    Raises ValueError (empty input, zero vectors, mismatches, duplicate ids) naming the file.
    ``allow_empty`` accepts zero vectors (one worker's group may have none).
    """
    sources = list(sources)
    if not sources and not allow_empty:
        raise ValueError("no embedding sources given: nothing to index")
    rows, dim, first = [], None, None
    for src in sources:
        if not isinstance(src, EmbeddingSource):
            raise TypeError(f"expected EmbeddingSource, got {type(src).__name__}")
        shape, dtype = _npy_header(src.path)
        if len(shape) != 2:
            raise ValueError(f"{src.path}: embeddings must be 2-D (rows, dim), got shape {shape}")
        if dtype not in ACCEPTED_DTYPES:
            raise ValueError(f"{src.path}: embeddings must be float16 or float32, got {dtype}")
        if len(src.ids) != shape[0]:
            raise ValueError(f"{src.path}: {shape[0]} rows but {len(src.ids)} ids")
        if dim is None:
            dim, first = shape[1], src.path
        elif shape[1] != dim:
            raise ValueError(f"dimension mismatch: {src.path} has dim {shape[1]}, {first} has dim {dim}")
        rows.append(int(shape[0]))
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    if offsets[-1] == 0 and not allow_empty:
        raise ValueError(f"the {len(sources)} embedding sources hold zero vectors: nothing to index")
    if dim == 0:
        raise ValueError(f"{first}: embeddings have dimension 0")
    if check_unique_ids:
        all_ids = np.concatenate([s.ids for s in sources])
        uniq, counts = np.unique(all_ids, return_counts=True)
        if len(uniq) != len(all_ids):
            dup = uniq[counts > 1]
            raise ValueError(f"{len(dup)} ids occur more than once (e.g. {dup[:3].tolist()}): ids must be unique")
    return Corpus(sources=sources, rows=rows, dim=int(dim or 0), offsets=offsets)


def default_chunk_rows(dim: int) -> int:
    return max(1024, CHUNK_BYTES // (4 * dim))


def iter_chunks(corpus: Corpus, chunk_rows: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (float32 vectors, int64 ids) chunks in source order."""
    chunk_rows = chunk_rows or default_chunk_rows(corpus.dim)
    for src, n in zip(corpus.sources, corpus.rows):
        if n == 0:
            continue
        data = np.load(src.path, mmap_mode="r")
        for start in range(0, n, chunk_rows):
            stop = min(n, start + chunk_rows)
            yield np.ascontiguousarray(data[start:stop], dtype=np.float32), src.ids[start:stop]
        del data  # unmap before the next file: resident pages stay bounded by one file


def sample_positions(n: int, size: int, seed: int, stream: int) -> np.ndarray:
    """Sorted global row positions, a deterministic sample of ``min(size, n)`` of ``range(n)``.

    ``stream`` separates independent samples (training, queries) drawn from one seed.
    """
    if size >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, stream])
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


def gather_rows(corpus: Corpus, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Read the rows at sorted global ``positions`` as float32, with their ids."""
    out = np.empty((len(positions), corpus.dim), dtype=np.float32)
    ids = np.empty(len(positions), dtype=np.int64)
    which = np.searchsorted(corpus.offsets, positions, side="right") - 1
    for i in np.unique(which):
        mask = which == i
        local = positions[mask] - corpus.offsets[i]
        data = np.load(corpus.sources[i].path, mmap_mode="r")
        out[mask] = data[local]
        ids[mask] = corpus.sources[i].ids[local]
        del data
    return out, ids
