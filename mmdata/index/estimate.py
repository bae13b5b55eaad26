"""Choose among the candidates that fit the budget by a quick measured estimate of their recall.

Each candidate (``choose.candidates``) is built at a small scale from the bounded training sample
the build draws anyway, on one thread: the sample is shuffled (seeded); ``EST_QUERIES`` rows become held-out
queries, the other rows (at most ``EST_DB``) the database, and the first ``EST_TRAIN`` of those
train the codes, as the real build trains on a sample of the vectors it encodes. The candidate's
factory string keeps its codes and changes only the number of lists, scaled so that a list holds
as many vectors as at full scale (``scaled_key``); all lists are probed, so the figure is the
recall its codes allow once nprobe is tuned high enough. Recall@10 is measured against the exact
inner-product top-10 of the database. The candidates are then ranked by this estimate, the cheaper
first within ``RECALL_TIE`` (``choose.rank``). An OPQ rotation is measured last, and only when the
same PQ without it ranks first (a rotation gains a few points at most and trains longest); it trains
``EST_OPQ_NITER`` rounds here. Everything here runs on one thread: these jobs are small, and on busy
cores faiss' threads spend longer waiting for each other than working.

The estimate is for ranking: a smaller database is sparser than the corpus, so absolute recalls
run higher than the full index's, which the build measures and reports anyway.
"""
from __future__ import annotations

import math
import re
import time
from typing import Any

import numpy as np

from mmdata.index.backend import import_faiss, ivf_of, layers, new_index, set_seed, train
from mmdata.index.choose import (
    DEFAULT_MAX_TRAIN_VECTORS,
    MIN_POINTS_PER_CENTROID,
    Candidate,
    candidates,
    parse_index_key,
    rank,
)

EST_TRAIN = 5_000
EST_DB = 15_000
EST_QUERIES = 500
EST_MIN_ROWS = 2_000  # below this the prior ranks the candidates
EST_OPQ_NITER = 4
EST_OPQ_TRAIN = 5_000
EST_PQ_NITER = 6  # k-means rounds of the PQ codebooks here (faiss' default: 25)
K = 10


def scaled_key(key: str, n: int, n_db: int, n_train: int) -> tuple[str, int]:
    """``key`` with the list count scaled to ``n_db`` vectors (and no HNSW quantizer); (key, nlist)."""
    parsed = parse_index_key(key)
    if parsed is None or "nlist" not in parsed:
        return key, 0
    want = parsed["nlist"] * n_db / max(1, n)
    cap = max(1, n_train // MIN_POINTS_PER_CENTROID)
    nlist = int(2 ** max(0, math.floor(math.log2(max(1.0, min(want, cap))))))
    return re.sub(r"IVF\d+(?:_HNSW\d+)?", f"IVF{nlist}", key), nlist


def _split(sample: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, database, queries) rows of the shuffled sample."""
    order = np.random.default_rng([seed, 2]).permutation(len(sample))
    n_queries = min(EST_QUERIES, len(sample) // 10)
    queries = sample[order[:n_queries]]
    rest = order[n_queries:]
    db = sample[np.sort(rest[:EST_DB])]
    return db[:EST_TRAIN], db, queries


def measure(faiss: Any, key: str, n: int, train_rows: np.ndarray, db: np.ndarray, queries: np.ndarray,
            truth: np.ndarray, seed: int) -> dict:
    """Recall@10 of ``key`` scaled to ``db``, all lists probed; with the seconds it took."""
    start = time.perf_counter()
    small, nlist = scaled_key(key, n, len(db), len(train_rows))
    index = new_index(faiss, small, db.shape[1])
    keep = []
    for part in layers(faiss, index):
        if isinstance(part, faiss.IndexPreTransform):
            for i in range(part.chain.size()):
                opq = faiss.downcast_VectorTransform(part.chain.at(i))
                if isinstance(opq, faiss.OPQMatrix):
                    opq.niter, opq.max_train_points = EST_OPQ_NITER, EST_OPQ_TRAIN
                    inner = faiss.ProductQuantizer(opq.d_out, opq.M, 8)
                    inner.cp.niter, inner.cp.min_points_per_centroid = EST_PQ_NITER, 16
                    opq.pq = inner  # kept alive by ``keep`` until training is done
                    keep.append(inner)
    set_seed(faiss, index, seed)
    ivf = ivf_of(faiss, index)
    if getattr(ivf, "pq", None) is not None:
        ivf.pq.cp.niter, ivf.pq.cp.min_points_per_centroid = EST_PQ_NITER, 16  # a smaller sample, knowingly
    train(faiss, index, train_rows)
    index.add_with_ids(db, np.arange(len(db), dtype=np.int64))
    if nlist:
        faiss.ParameterSpace().set_index_parameters(index, f"nprobe={nlist}")
    _, found = index.search(queries, K)
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=2).sum()
    return {"key": key, "scaled_key": small, "recall_at_10": round(float(hits) / truth.size, 4),
            "seconds": round(time.perf_counter() - start, 3)}


def choose_measured(sample: np.ndarray, n: int, memory_gb: float, *, max_train_vectors: int = DEFAULT_MAX_TRAIN_VECTORS,
                    mergeable_only: bool = False, seed: int = 0) -> tuple[str, dict]:
    """The candidate with the best estimated recall (then the cheapest) and a record of the choice.

    ``sample``: float32 rows drawn from the ``n`` vectors (the training sample). Raises ValueError
    when nothing fits ``memory_gb``.
    """
    start = time.perf_counter()
    dim = sample.shape[1]
    found: list[Candidate] = candidates(n, dim, memory_gb, max_train_vectors=max_train_vectors,
                                        mergeable_only=mergeable_only)
    record: dict = {"method": "prior", "candidates": [c.as_dict() for c in found]}
    if len(found) > 1 and len(sample) >= EST_MIN_ROWS:
        faiss = import_faiss()
        train_rows, db, queries = _split(np.ascontiguousarray(sample, dtype=np.float32), seed)
        _, truth = faiss.knn(queries, db, K, metric=faiss.METRIC_INNER_PRODUCT)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # small jobs: one thread is faster than waiting on busy cores
        try:
            found = _measure_all(faiss, found, record, n, train_rows, db, queries, truth, seed)
        finally:
            faiss.omp_set_num_threads(threads)
        record.update(method="measured", n_train=len(train_rows), n_db=len(db), n_queries=len(queries))
    else:
        order = {c.key: i for i, c in enumerate(found)}
        record["candidates"].sort(key=lambda row: order[row["key"]])
    record["chosen"] = found[0].key
    record["seconds"] = round(time.perf_counter() - start, 3)
    return found[0].key, record


def _measure_all(faiss: Any, found: list[Candidate], record: dict, n: int, train_rows: np.ndarray, db: np.ndarray,
                 queries: np.ndarray, truth: np.ndarray, seed: int) -> list[Candidate]:
    """Measure the candidates (OPQ ones only where they may pay), rank them, note it all in ``record``."""
    estimates: dict[str, float] = {}
    rows = {row["key"]: row for row in record["candidates"]}
    # the rotations last, and only where their plain PQ ranks first: OPQ improves on that PQ by a few
    # points at most, and its training is the dearest of all
    for c in sorted(found, key=lambda c: c.key.startswith("OPQ")):
        if c.key.startswith("OPQ"):
            plain = c.key.split(",", 1)[1]
            leader = rank([f for f in found if f.key in estimates], estimates)[0].key if estimates else None
            if plain != leader:
                rows[c.key]["skipped"] = f"{plain} does not rank first ({leader} does)"
                continue
        result = measure(faiss, c.key, n, train_rows, db, queries, truth, seed)
        estimates[c.key] = result["recall_at_10"]
        rows[c.key].update(estimated_recall_at_10=result["recall_at_10"], scaled_key=result["scaled_key"],
                           estimate_seconds=result["seconds"])
    found = rank([c for c in found if c.key in estimates], estimates)
    record["candidates"] = [rows[c.key] for c in found] + [r for r in record["candidates"] if "skipped" in r]
    return found
