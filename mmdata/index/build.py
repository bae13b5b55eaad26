"""Build a FAISS index from embedding files in one process, and load it back for search.

The recipe (shared with the distributed build, see ``distributed.py``):

1. validate every source; draw a bounded, seeded sample of the vectors; unless an index type is
   forced, choose the one with the best recall estimated on that sample among those that fit the
   memory budget (``choose.py`` lists them, ``estimate.py`` measures them);
2. train the empty index on the sample;
3. add all vectors in chunks, with their int64 ids, reading the files memory-mapped;
4. draw seeded queries from the data, compute their exact top-10 by a streamed flat scan, tune
   nprobe / efSearch to the recall target, measure recall@1/@10 and ms per query;
5. write the index atomically (the tuned parameters are stored in the file too).

Determinism: with the same inputs, seed and faiss build, two CPU builds write identical bytes.
k-means is seeded (``cp.seed``), faiss' parallel loops partition work by centroid and by list,
and the training sample, add order and queries are fixed, so thread count does not change the
result for Flat and IVF types (checked in the tests at 1 and 2 threads; the distributed build
writes the same bytes too). An OPQ rotation (SVD through BLAS) is reproducible at a fixed thread
count only. HNSW inserts in parallel under per-node locks, which faiss does not promise to be
reproducible with more than one thread: an HNSW coarse quantizer is therefore rebuilt on one thread
after training (``backend.train``). GPU builds are not guaranteed bit-identical.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

from mmdata.index.backend import (
    apply_search_params,
    gpu_train_helper,
    import_faiss,
    ivf_of,
    new_index,
    params_string,
    resolve_gpu,
    set_seed,
    to_gpu,
    train,
    write_index_atomic,
)
from mmdata.index.choose import (
    BUDGET_FRACTION,
    DEFAULT_MAX_TRAIN_VECTORS,
    GiB,
    estimate_index_bytes,
    estimate_ram_bytes,
    is_mergeable,
)
from mmdata.index.estimate import choose_measured
from mmdata.index.evaluate import (
    DEFAULT_N_QUERIES,
    drop_self_scored,
    exact_knn,
    exact_scorer,
    measure,
    sample_queries,
    tune_search_params,
)
from mmdata.index.sources import Corpus, EmbeddingSource, gather_rows, iter_chunks, sample_positions, validate_sources

TRAIN_STREAM = 0  # rng stream for the training sample (queries use 1)
RECALL_K = 10
QUERY_PROTOCOL = ("leave-one-out: indexed vectors as queries, each excluded from its own results; "
                  "nprobe/efSearch tuned on one half of the queries, recall measured on the other")


def training_sample(corpus: Corpus, max_train_vectors: int, seed: int):
    """The seeded sample of at most ``max_train_vectors`` rows (float32) that training and the choice use."""
    return gather_rows(corpus, sample_positions(corpus.n, max_train_vectors, seed, TRAIN_STREAM))[0]


def choose_for_corpus(corpus: Corpus, memory_gb: float, *, max_train_vectors: int = DEFAULT_MAX_TRAIN_VECTORS,
                      seed: int = 0, mergeable_only: bool = False) -> tuple[str, dict]:
    """The index type for ``corpus`` under ``memory_gb``, by recall estimated on the training sample;
    (factory string, record of the choice for index_infos.json)."""
    sample = training_sample(corpus, max_train_vectors, seed)
    return choose_measured(sample, corpus.n, memory_gb, max_train_vectors=max_train_vectors,
                           mergeable_only=mergeable_only, seed=seed)


def train_empty(
    faiss: Any, corpus: Corpus, index_key: str, *, max_train_vectors: int, seed: int, gpu: bool
) -> tuple[Any, dict]:
    """An empty index of ``index_key`` trained on a seeded sample of at most ``max_train_vectors``."""
    index = new_index(faiss, index_key, corpus.dim)
    info = {"train_vectors": 0, "train_seconds": 0.0}
    if index.is_trained:
        return index, info
    start = time.perf_counter()
    sample = training_sample(corpus, max_train_vectors, seed)
    set_seed(faiss, index, seed)
    helper = gpu_train_helper(faiss, index) if gpu else None
    train(faiss, index, sample)
    if helper is not None:
        ivf_of(faiss, index).clustering_index = None
    info.update(train_vectors=int(len(sample)), train_seconds=round(time.perf_counter() - start, 3))
    return index, info


def add_all(faiss: Any, index: Any, corpus: Corpus, *, gpu: bool, chunk_rows: int | None = None) -> tuple[Any, float]:
    """Add every vector of ``corpus`` with its id, chunk by chunk; returns (CPU index, seconds)."""
    start = time.perf_counter()
    target = to_gpu(faiss, index) if gpu else index
    for vectors, ids in iter_chunks(corpus, chunk_rows):
        target.add_with_ids(vectors, ids)
    if gpu:
        index = faiss.index_gpu_to_cpu(target)
    return index, round(time.perf_counter() - start, 3)


def tune_and_write(
    faiss: Any,
    index: Any,
    corpus: Corpus,
    out_path: str,
    *,
    recall_target: float,
    n_queries: int,
    seed: int,
    chunk_rows: int | None = None,
) -> dict:
    """Tune the search knob against exact search, measure, write ``index``; returns those infos."""
    if index.ntotal != corpus.n:
        raise ValueError(f"the index holds {index.ntotal} vectors but the sources hold {corpus.n}")
    start = time.perf_counter()
    k = min(RECALL_K, corpus.n - 1)  # leave-one-out: each query's own vector is not a result
    if k < 1:  # a single vector: nothing to measure against
        size = write_index_atomic(faiss, index, out_path)
        return {"search_params": {}, "search_params_string": "", "recall_target": recall_target,
                "recall_target_reached": True, "tune_recall_target_reached": True,
                "recall_at_1": 1.0, "recall_at_10": 1.0, "ms_per_query": 0.0,
                "n_queries": 0, "n_tune_queries": 0, "query_protocol": QUERY_PROTOCOL, "tuning_curve": [],
                "tune_seconds": 0.0, "size_bytes": int(size)}
    queries, query_ids = sample_queries(corpus, n_queries, seed)
    truth_scores, truth = drop_self_scored(*exact_knn(corpus, queries, k + 1, chunk_rows), query_ids, k)
    scorer = exact_scorer(corpus)  # tie-aware recall: found ids are re-scored exactly
    # tune on one half, measure on the other (the same queries when there are too few to split)
    half = len(queries) // 2 if len(queries) >= 40 else 0
    tune, held = slice(0, half or len(queries)), slice(half, len(queries))
    tuned = tune_search_params(index, queries[tune], truth[tune], recall_target, k, query_ids[tune],
                               truth_scores[tune], scorer)
    measured = measure(index, queries[held], truth[held], k, query_ids[held], truth_scores[held], scorer)
    measured["n_tune_queries"] = int(half or len(queries))
    tune_seconds = round(time.perf_counter() - start, 3)
    size = write_index_atomic(faiss, index, out_path)
    return {
        "search_params": tuned["params"],
        "search_params_string": params_string(tuned["params"]),
        "recall_target": recall_target,
        # agrees with the reported (held-out) figure; the tuning half's own verdict is kept apart
        "recall_target_reached": bool(measured["recall_at_10"] >= recall_target),
        "tune_recall_target_reached": bool(tuned["reached"]),
        **measured,
        "query_protocol": QUERY_PROTOCOL,
        "tuning_curve": tuned["curve"],
        "tune_seconds": tune_seconds,
        "size_bytes": int(size),
    }


def describe(faiss: Any, corpus: Corpus, index_key: str, *, memory_gb: float, seed: int, gpu: bool) -> dict:
    """The infos fields fixed before building: what is built, from what, under which budget."""
    budget = int(BUDGET_FRACTION * memory_gb * GiB)
    estimate = estimate_index_bytes(index_key, corpus.n, corpus.dim)
    ram = estimate_ram_bytes(index_key, corpus.n, corpus.dim)
    return {
        "index_key": index_key,
        "metric": "inner_product",
        "n": corpus.n,
        "dim": corpus.dim,
        "n_sources": len(corpus.sources),
        "memory_gb": memory_gb,
        "budget_bytes": budget,
        "estimated_bytes": estimate,
        "estimated_ram_bytes": ram,
        "within_budget": None if estimate is None else max(estimate, ram) <= budget,
        "mergeable": is_mergeable(index_key),
        "seed": seed,
        "gpu": gpu,
        "omp_threads": int(faiss.omp_get_max_threads()),
        "faiss_version": getattr(faiss, "__version__", "unknown"),
    }


def build_index(
    sources: list[EmbeddingSource],
    out_path: str,
    *,
    index_key: str | None = None,
    memory_gb: float = 4.0,
    recall_target: float = 0.95,
    max_train_vectors: int = DEFAULT_MAX_TRAIN_VECTORS,
    n_queries: int = DEFAULT_N_QUERIES,
    seed: int = 0,
    use_gpu: bool | str = "auto",
    chunk_rows: int | None = None,
    choice: dict | None = None,
) -> dict:
    """Build an inner-product index of ``sources`` at ``out_path``; returns the infos dict.

    ``index_key`` forces a faiss factory string; by default ``choose_for_corpus`` picks the one with
    the best estimated recall that fits ``memory_gb`` GiB (``choice``: a record of a choice made by
    the caller, kept in the infos). The caller writes the infos as ``index_infos.json``.
    """
    faiss = import_faiss()
    start = time.perf_counter()
    corpus = validate_sources(sources)
    key = index_key
    if key is None:
        key, choice = choose_for_corpus(corpus, memory_gb, max_train_vectors=max_train_vectors, seed=seed)
    gpu = resolve_gpu(faiss, use_gpu, key)
    infos = describe(faiss, corpus, key, memory_gb=memory_gb, seed=seed, gpu=gpu)
    infos["choice"] = choice or {"method": "forced"}
    infos["choose_seconds"] = infos["choice"].get("seconds", 0.0)
    index, train_info = train_empty(
        faiss, corpus, key, max_train_vectors=max_train_vectors, seed=seed, gpu=gpu
    )
    index, add_seconds = add_all(faiss, index, corpus, gpu=gpu, chunk_rows=chunk_rows)
    infos.update(train_info, add_seconds=add_seconds)
    infos.update(
        tune_and_write(
            faiss, index, corpus, out_path,
            recall_target=recall_target, n_queries=n_queries, seed=seed, chunk_rows=chunk_rows,
        )
    )
    infos["build_seconds"] = round(time.perf_counter() - start, 3)
    return infos


def load_index(path: str, infos: dict | str | None = None) -> Any:
    """Read an index and apply the search parameters stored in ``infos`` (dict or json path)."""
    faiss = import_faiss()
    if not os.path.exists(path):
        raise FileNotFoundError(f"no index at {path}")
    index = faiss.read_index(path)
    if isinstance(infos, (str, os.PathLike)):
        with open(infos) as fh:
            infos = json.load(fh)
    if infos:
        if "n" in infos and infos["n"] != index.ntotal:
            raise ValueError(f"infos describe {infos['n']} vectors but {path} holds {index.ntotal}")
        apply_search_params(faiss, index, infos.get("search_params") or {})
    return index
