"""Build one index from many workers: train once, add per group of files, merge, tune.

The four steps an engine (Dask, Beam, ...) schedules (``mmdata.index.parts`` drives them in a
build, through ``Engine.map_tasks``); this module imports neither:

    train_infos = train_index(all_sources, "trained.index")              # driver, once
    part_infos = [add_partial("trained.index", group, f"part{i}.index")  # workers, in parallel
                  for i, group in enumerate(groups)]
    merge_partials("trained.index", [f"part{i}.index" ...], "final.index")  # driver
    infos = finalize_index("final.index", all_sources, train_infos=train_infos,
                           partial_infos=part_infos)                     # driver

Every partial starts from the same trained file, so the coarse quantizer and codebooks are
shared and merging (``merge_from``) only concatenates inverted lists (or Flat codes) in the order
of ``partial_paths``. With groups that are consecutive slices of the sources, in order, the
merged index is the single-process index, byte for byte. Only merge-able types are accepted:
Flat and IVF*; HNSW graphs cannot be merged, so ``train_index`` refuses them.
"""
from __future__ import annotations

import time
from typing import Any

from mmdata.index.backend import import_faiss, merge_into, resolve_gpu, write_index_atomic
from mmdata.index.build import add_all, choose_for_corpus, describe, train_empty, tune_and_write
from mmdata.index.choose import DEFAULT_MAX_TRAIN_VECTORS, is_mergeable
from mmdata.index.evaluate import DEFAULT_N_QUERIES
from mmdata.index.sources import Corpus, EmbeddingSource, validate_sources


def train_index(
    sources: list[EmbeddingSource],
    out_trained_path: str,
    *,
    index_key: str | None = None,
    memory_gb: float = 4.0,
    max_train_vectors: int = DEFAULT_MAX_TRAIN_VECTORS,
    seed: int = 0,
    use_gpu: bool | str = "auto",
    choice: dict | None = None,
) -> dict:
    """Train the empty index once on a bounded sample of all ``sources``; returns train infos.

    Without ``index_key`` the index is chosen as ``build_index`` does, among the mergeable types.
    """
    faiss = import_faiss()
    corpus = validate_sources(sources)
    key = index_key
    if key is None:
        key, choice = choose_for_corpus(corpus, memory_gb, max_train_vectors=max_train_vectors, seed=seed,
                                        mergeable_only=True)
    if not is_mergeable(key):
        raise ValueError(f"{key} cannot be merged from partial builds; use a Flat or IVF index")
    gpu = resolve_gpu(faiss, use_gpu, key)
    infos = describe(faiss, corpus, key, memory_gb=memory_gb, seed=seed, gpu=gpu)
    infos["choice"] = choice or {"method": "forced"}
    infos["choose_seconds"] = infos["choice"].get("seconds", 0.0)
    index, train_info = train_empty(faiss, corpus, key, max_train_vectors=max_train_vectors, seed=seed, gpu=gpu)
    write_index_atomic(faiss, index, out_trained_path)
    return {**infos, **train_info}


def _group_corpus(sources: list[EmbeddingSource], dim: int) -> Corpus:
    """Validate one group; it may hold no vectors (a unit whose samples were all dropped)."""
    corpus = validate_sources(sources, allow_empty=True)
    if corpus.sources and corpus.dim != dim:
        raise ValueError(f"dimension mismatch: sources have dim {corpus.dim}, the trained index {dim}")
    return corpus


def add_partial(
    trained_path: str,
    sources: list[EmbeddingSource],
    out_partial_path: str,
    *,
    use_gpu: bool | str = "auto",
    chunk_rows: int | None = None,
) -> dict:
    """Add one group of files into a copy of the trained index, written to ``out_partial_path``."""
    faiss = import_faiss()
    index = faiss.read_index(trained_path)
    if index.ntotal != 0:
        raise ValueError(f"{trained_path} already holds {index.ntotal} vectors; pass the trained, empty index")
    corpus = _group_corpus(sources, index.d)
    seconds = 0.0
    if corpus.n > 0:
        gpu = resolve_gpu(faiss, use_gpu, "")
        index, seconds = add_all(faiss, index, corpus, gpu=gpu, chunk_rows=chunk_rows)
    write_index_atomic(faiss, index, out_partial_path)
    return {"path": out_partial_path, "n": int(index.ntotal), "add_seconds": seconds}


def _training_of(faiss: Any, index: Any) -> bytes:
    """The serialized index with its vectors removed: what training produced."""
    empty = faiss.clone_index(index)
    empty.reset()
    return faiss.serialize_index(empty).tobytes()


def merge_partials(trained_path: str, partial_paths: list[str], out_path: str) -> dict:
    """Merge the partial indexes, in the given order, into ``out_path``; returns merge infos.

    Raises ValueError if a partial was not added to this trained index.
    """
    faiss = import_faiss()
    if not partial_paths:
        raise ValueError("no partial indexes to merge")
    start = time.perf_counter()
    merged = faiss.read_index(trained_path)
    training = _training_of(faiss, merged)
    for path in partial_paths:
        part = faiss.read_index(path)
        if _training_of(faiss, part) != training:
            raise ValueError(f"{path} was not built from the trained index {trained_path}")
        merge_into(faiss, merged, part)
        del part
    size = write_index_atomic(faiss, merged, out_path)
    return {
        "n": int(merged.ntotal),
        "n_partials": len(partial_paths),
        "merge_seconds": round(time.perf_counter() - start, 3),
        "size_bytes": int(size),
    }


def finalize_index(
    index_path: str,
    sources: list[EmbeddingSource],
    *,
    train_infos: dict,
    partial_infos: list[dict] | None = None,
    merge_infos: dict | None = None,
    recall_target: float = 0.95,
    n_queries: int = DEFAULT_N_QUERIES,
    chunk_rows: int | None = None,
) -> dict:
    """Tune and evaluate the merged index against exact search over all ``sources``, rewrite it.

    Returns the same infos as ``build_index`` (``add_seconds`` summed over the partials).
    """
    faiss = import_faiss()
    corpus = validate_sources(sources)
    index = faiss.read_index(index_path)
    infos = dict(train_infos)
    infos["add_seconds"] = round(sum(p.get("add_seconds", 0.0) for p in partial_infos or []), 3)
    if merge_infos:
        infos["merge_seconds"] = merge_infos.get("merge_seconds")
    infos.update(
        tune_and_write(
            faiss, index, corpus, index_path,
            recall_target=recall_target, n_queries=n_queries, seed=train_infos["seed"], chunk_rows=chunk_rows,
        )
    )
    infos["build_seconds"] = round(
        infos.get("choose_seconds", 0.0) + infos.get("train_seconds", 0.0) + infos["add_seconds"] + (infos.get("merge_seconds") or 0.0) + infos["tune_seconds"], 3
    )
    infos["distributed"] = True
    return infos
