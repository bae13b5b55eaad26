"""SemDeDup: semantic near-duplicates within k-means clusters of the embeddings; the steps that
``mmdata.curate.semantic_tasks`` runs as engine tasks over a curation's per-shard files.

1. k-means (FAISS, spherical) on a seeded sample of at most ``train_size`` vectors;
2. every vector goes to its nearest centre (``search``, in chunks of the global candidate order);
3. clusters are grouped into tasks that the engine runs independently: a task reads only its
   clusters' vectors, so memory is bounded by the largest task, not the corpus;
4. within a cluster, members are ranked by the keep rule (``nearest``: highest cosine to the centre
   first; ``farthest``: lowest first; ties by candidate order, which is key order), and a member is
   a duplicate when its cosine to any better-ranked member is ≥ 1 - eps (as in Abbas et al. 2023).
   Its ledger names the sample kept for it: the best-ranked member it is most similar to, followed
   while that one is itself a duplicate.
"""
from __future__ import annotations

import math

import numpy as np

from mmdata.curate.vectors import VectorSet

BLOCK = 1024  # rows of the similarity matrix computed at once (memory: BLOCK x cluster size floats)
TASK_BYTES = 256 * 2**20  # float32 vectors one cluster task holds, about (a cluster bigger than this is one task)


def default_clusters(n: int) -> int:
    return max(1, int(round(math.sqrt(n))))


def train_centroids(vectors: VectorSet, k: int, train_size: int, seed: int) -> np.ndarray:
    """k-means centres (L2-normalised) from a seeded sample of the candidates."""
    import faiss

    n = len(vectors)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, train_size), replace=False)) if n > train_size else np.arange(n)
    x = np.ascontiguousarray(vectors.take(sample))
    k = max(1, min(k, len(x)))
    km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=max(256, -(-len(x) // k)))
    km.train(x)
    centres = km.centroids.astype(np.float32)
    centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    return centres


def group_clusters(sizes: np.ndarray, n_tasks: int) -> list[list[int]]:
    """Clusters into ``n_tasks`` groups holding about as many vectors each (largest cluster first, to
    the group with the fewest): a task's memory is its vectors."""
    n_tasks = max(1, min(n_tasks, int((sizes > 0).sum()) or 1))
    groups: list[list[int]] = [[] for _ in range(n_tasks)]
    work, rows = np.zeros(n_tasks), np.zeros(n_tasks)
    for c in sorted(np.flatnonzero(sizes > 0).tolist(), key=lambda c: (-int(sizes[c]), c)):
        g = int(np.lexsort((work, rows))[0])  # the group holding the fewest vectors, then the least work
        groups[g].append(c)
        work[g] += float(sizes[c]) ** 2
        rows[g] += float(sizes[c])
    return [sorted(g) for g in groups if g]


def dedup_cluster(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of ``x`` (ranked best first) that are duplicates: (their rows, the row kept for each, cosine).

    Row j is a duplicate when max_{i<j} x_i·x_j ≥ threshold; its kept row is that argmax i, or, when i
    is itself a duplicate, the row kept for i.
    """
    m = len(x)
    best = np.full(m, -1, dtype=np.int64)
    best_sim = np.full(m, -np.inf, dtype=np.float32)
    for start in range(1, m, BLOCK):
        stop = min(start + BLOCK, m)
        s = x[start:stop] @ x[:stop].T  # rows j in [start, stop), columns i < stop
        s[np.arange(stop - start)[:, None] <= (np.arange(stop)[None, :] - start)] = -np.inf  # keep only i < j
        best[start:stop] = np.argmax(s, axis=1)
        best_sim[start:stop] = s[np.arange(stop - start), best[start:stop]]
    dup = best_sim >= threshold
    kept = np.arange(m)
    for j in np.flatnonzero(dup):  # ascending: best[j] < j is resolved already
        kept[j] = kept[best[j]]
    rows = np.flatnonzero(dup)
    return rows, kept[rows], best_sim[rows]


def _dedup_members(clusters: list[int], cluster: np.ndarray, sim: np.ndarray, ids: np.ndarray, x_all: np.ndarray,
                   threshold: float, keep: str) -> np.ndarray:
    """SemDeDup of the members (``ids``, in candidate order, with their cluster, centre cosine and
    vectors) of ``clusters``: rows (duplicate id, kept id, cosine * 1e6) as int64."""
    found = []
    for c in clusters:
        local = np.flatnonzero(cluster == c)
        if len(local) < 2:
            continue
        score = sim[local] if keep == "farthest" else -sim[local]
        order = local[np.lexsort((ids[local], score))]  # best first; ties by candidate order
        dup, kept, cos = dedup_cluster(x_all[order], threshold)
        if len(dup):
            found.append(np.stack([ids[order[dup]], ids[order[kept]], np.round(cos.astype(np.float64) * 1e6)
                                   .astype(np.int64)], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 3), dtype=np.int64)


SEARCH_CHUNK = 65536  # candidates searched at once when assigning (chunks of the global candidate order)
BLAS_ROWS = 20  # faiss's distance_compute_blas_threshold: fewer queries are searched without BLAS


def search(index, x: np.ndarray, blas: bool):
    """``index.search(x, 1)`` by the path faiss takes for a batch of that kind: BLAS (a batch of at
    least ``BLAS_ROWS``, padded with zero rows) or not (batches below it); the same bits either way."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if blas and len(x) < BLAS_ROWS:
        d, i = index.search(np.vstack([x, np.zeros((BLAS_ROWS - len(x), x.shape[1]), np.float32)]), 1)
        return d[: len(x)], i[: len(x)]
    if not blas and len(x) >= BLAS_ROWS:
        parts = [index.search(x[s:s + BLAS_ROWS - 1], 1) for s in range(0, len(x), BLAS_ROWS - 1)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return index.search(x, 1)
