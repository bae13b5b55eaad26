"""Search, exact ground truth, recall, and tuning of nprobe / efSearch to a recall target.

Recall@k here is the overlap of the index's top-k ids with the exact (flat inner-product) top-k
ids, averaged over queries: |found ∩ exact| / k. Recall@1 is the share of queries whose top id
is the exact top id. Queries are a seeded sample of the indexed vectors, each held out of its own
results (leave-one-out: a query's own id is dropped from both the exact and the index's top-k, so
a vector finding itself never counts); the sample is split in two disjoint halves, one to tune the
search knob on and one to measure the recall that ``index_infos.json`` reports.

Recall is tie-aware: a returned id also counts as correct when its exact score ties the k-th exact
score (within ``TIE_TOL``), so identical copies in the corpus, which make the exact top-k ids
arbitrary among equals, do not lower the figure: an exact (Flat) index always reports 1.0. The
returned ids are re-scored exactly against the stored vectors (not with the index's own, possibly
compressed, scores), so a compressed index cannot earn a hit from its approximation error.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from mmdata.index.backend import apply_search_params, import_faiss, ivf_of
from mmdata.index.sources import Corpus, gather_rows, iter_chunks, sample_positions

QUERY_STREAM = 1  # rng stream for query sampling (training uses 0)
DEFAULT_N_QUERIES = 1000
SEARCH_BATCH = 4096
EF_SEARCH_MAX = 4096
PLATEAU = 0.002  # when the target is out of reach, the cheapest value within this of the best
TIE_TOL = 1e-5  # relative: scores this close to the k-th exact score count as ties

Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (queries, ids (nq, k)) -> exact scores (nq, k)


def search(index: Any, queries: np.ndarray, k: int, *, batch_size: int = SEARCH_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) for each query row; queries of any float dtype, searched in batches.

    Missing results (fewer than ``k`` vectors reachable) have id -1.
    """
    queries = np.asarray(queries)
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise ValueError(f"queries must have shape (nq, {index.d}), got {queries.shape}")
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    scores = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), batch_size):
        batch = np.ascontiguousarray(queries[start : start + batch_size], dtype=np.float32)
        scores[start : start + len(batch)], ids[start : start + len(batch)] = index.search(batch, k)
    return scores, ids


def sample_queries(corpus: Corpus, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic sample of ``min(n_queries, n)`` indexed vectors, as float32 queries, with their ids."""
    return gather_rows(corpus, sample_positions(corpus.n, n_queries, seed, QUERY_STREAM))


def drop_self(ids: np.ndarray, self_ids: np.ndarray | None, k: int) -> np.ndarray:
    """The first ``k`` ids of each row once the query's own id is removed (rows keep their order)."""
    return drop_self_scored(ids, ids, self_ids, k)[1]


def drop_self_scored(scores: np.ndarray, ids: np.ndarray, self_ids: np.ndarray | None,
                     k: int) -> tuple[np.ndarray, np.ndarray]:
    """``drop_self`` for (scores, ids) pairs: both come back without the query's own id, first ``k``."""
    if self_ids is None:
        return scores[:, :k], ids[:, :k]
    is_self = ids == np.asarray(self_ids)[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")  # self (True) moves to the end
    return np.take_along_axis(scores, order, axis=1)[:, :k], np.take_along_axis(ids, order, axis=1)[:, :k]


def exact_scorer(corpus: Corpus) -> Scorer:
    """A function giving the exact inner products of query rows with the stored vectors of given ids.

    Ids that are not in the corpus (-1: no result) score ``-inf``.
    """
    all_ids = np.concatenate([s.ids for s in corpus.sources])
    order = np.argsort(all_ids, kind="stable")
    sorted_ids = all_ids[order]

    def score(queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.ravel()
        at = np.clip(np.searchsorted(sorted_ids, flat), 0, len(sorted_ids) - 1)
        known = sorted_ids[at] == flat
        positions = order[at[known]]
        unique, inverse = np.unique(positions, return_inverse=True)
        vectors, _ = gather_rows(corpus, unique)
        rows = np.repeat(np.arange(len(ids)), ids.shape[1])[known]
        q = np.asarray(queries, dtype=np.float32)
        out = np.full(flat.shape, -np.inf, dtype=np.float32)
        out[known] = np.einsum("ij,ij->i", q[rows], vectors[inverse.ravel()])
        return out.reshape(ids.shape)

    return score


def found_ids(index: Any, queries: np.ndarray, k: int, self_ids: np.ndarray | None = None) -> np.ndarray:
    """The index's top-``k`` ids per query, the query's own id excluded when ``self_ids`` is given."""
    return drop_self(search(index, queries, k + (self_ids is not None))[1], self_ids, k)


def exact_knn(corpus: Corpus, queries: np.ndarray, k: int, chunk_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` (scores, ids) over the whole corpus, streamed chunk by chunk."""
    faiss = import_faiss()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for vectors, ids in iter_chunks(corpus, chunk_rows):
        kk = min(k, len(vectors))
        scores, rows = faiss.knn(queries, vectors, kk, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, ids[rows])
    heap.finalize()
    return heap.D, heap.I


def recall_at(found: np.ndarray, truth: np.ndarray, k: int, found_scores: np.ndarray | None = None,
              truth_scores: np.ndarray | None = None) -> float:
    """Mean |top-k found ∩ top-k truth| / k; for k=1, the share of matching top ids.

    With exact ``found_scores`` and ``truth_scores`` it is tie-aware: a found id whose exact score
    reaches the k-th true score (within ``TIE_TOL``) counts as correct even when the exact search
    picked another id of the same score.
    """
    k = min(k, truth.shape[1])
    f, t = found[:, :k], truth[:, :k]
    hits = (f[:, :, None] == t[:, None, :]).any(axis=2)
    if found_scores is not None and truth_scores is not None:
        kth = np.asarray(truth_scores, dtype=np.float64)[:, k - 1 : k]
        tol = TIE_TOL * np.maximum(1.0, np.abs(kth))
        hits |= np.asarray(found_scores, dtype=np.float64)[:, :k] >= kth - tol
    hits &= f != -1  # -1: no result
    return float(hits.sum() / (len(t) * k))


def _recall(index: Any, queries: np.ndarray, truth_ids: np.ndarray, k: int, self_ids: np.ndarray | None,
            truth_scores: np.ndarray | None, scorer: Scorer | None) -> tuple[float, float, float]:
    """(recall@1, recall@k, search seconds) of ``index`` on ``queries``, tie-aware when a scorer is given."""
    start = time.perf_counter()
    found = found_ids(index, queries, k, self_ids)
    seconds = time.perf_counter() - start
    scores = scorer(queries, found) if scorer is not None and truth_scores is not None else None
    return (recall_at(found, truth_ids, 1, scores, truth_scores),
            recall_at(found, truth_ids, k, scores, truth_scores), seconds)


def _knob(faiss: Any, index: Any, k: int) -> tuple[str, int, int] | None:
    """(parameter name, smallest, largest) of the index's speed/recall knob; None for Flat."""
    ivf = ivf_of(faiss, index)
    if ivf is not None:
        return "nprobe", 1, int(ivf.nlist)
    inner = index.index if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(faiss.downcast_index(inner), faiss.IndexHNSW):
        return "efSearch", max(k, 16), EF_SEARCH_MAX
    return None


def tune_search_params(
    index: Any, queries: np.ndarray, truth_ids: np.ndarray, recall_target: float, k: int = 10,
    self_ids: np.ndarray | None = None, truth_scores: np.ndarray | None = None, scorer: Scorer | None = None,
) -> dict:
    """Smallest nprobe / efSearch whose recall@k reaches ``recall_target``; sets it on ``index``.

    Doubling finds a bracket, bisection the smallest passing value (recall is monotone in both
    knobs up to noise). If even the largest value misses the target, the cheapest value within
    PLATEAU of the best recall is kept and ``reached`` is False.
    Returns {"params": {...}, "reached": bool, "curve": [[value, recall], ...]}.
    """
    faiss = import_faiss()
    knob = _knob(faiss, index, k)
    if knob is None:
        at_k = _recall(index, queries, truth_ids, k, self_ids, truth_scores, scorer)[1]
        return {"params": {}, "reached": at_k >= recall_target, "curve": []}
    name, lowest, highest = knob
    curve: dict[int, float] = {}

    def recall(value: int) -> float:
        if value not in curve:
            apply_search_params(faiss, index, {name: value})
            curve[value] = _recall(index, queries, truth_ids, k, self_ids, truth_scores, scorer)[1]
        return curve[value]

    value, failing = lowest, None
    while recall(value) < recall_target and value < highest:
        failing, value = value, min(highest, value * 2)
    reached = curve[value] >= recall_target
    if reached and failing is not None:
        lo, hi = failing, value  # recall(lo) < target <= recall(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if recall(mid) >= recall_target else (mid, hi)
        value = hi
    elif not reached:
        best = max(curve.values())
        value = min(v for v, r in curve.items() if r >= best - PLATEAU)
    apply_search_params(faiss, index, {name: value})
    return {"params": {name: value}, "reached": reached, "curve": [[v, round(r, 5)] for v, r in sorted(curve.items())]}


def measure(index: Any, queries: np.ndarray, truth_ids: np.ndarray, k: int = 10,
            self_ids: np.ndarray | None = None, truth_scores: np.ndarray | None = None,
            scorer: Scorer | None = None) -> dict:
    """Recall@1, recall@10 and batched ms per query of ``index`` with its current parameters.

    ``k`` is 10 unless the corpus holds fewer vectors.
    """
    at_1, at_k, seconds = _recall(index, queries, truth_ids, k, self_ids, truth_scores, scorer)
    return {
        "recall_at_1": round(at_1, 5),
        "recall_at_10": round(at_k, 5),
        "ms_per_query": round(1000 * seconds / len(queries), 5),
        "n_queries": int(len(queries)),
    }
