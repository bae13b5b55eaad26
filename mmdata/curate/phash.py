"""Perceptual-hash near duplicates without an all-pairs search: multi-index hashing on the engine.

Pigeonhole: two 64-bit hashes within Hamming distance ``t`` agree exactly on at least one of ``t + 1``
disjoint bands of their bits. So:

1. identical hashes are collapsed first (a duplicate of the best-ranked holder of its hash, distance
   0): a thousand blank images (all-zero hashes) cost a sort, not a million comparisons;
2. every distinct hash is listed once per band under that band's value; the lists are cut into task
   files at bucket boundaries (about ``TASK_ROWS`` rows each; a bigger bucket is a task of its own),
   so a task holds its buckets only, never the corpus;
3. a task compares the members of each bucket pairwise in tiles (exact Hamming, bounded memory),
   skipping pairs that already agree on an earlier band (that band's bucket has them), and keeps,
   per hash, the best better-ranked hash within ``t``: lowest distance, then best rank;
4. the driver merges the tasks' bests (the minimum over buckets is the minimum over all pairs).

The result is the all-pairs rule: sample j (in rank order) is a duplicate of the better-ranked i
within ``t`` with the lowest (distance, i), whether or not i is itself a duplicate.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from mmdata.curate.markers import is_done, mark_done, read_mark
from mmdata.curate.vectors import load_npy, save_npy
from mmdata.storage import OutputDir

TASK_ROWS = 1 << 20  # (band, value, hash, rank) rows a task file holds, about: 32 MiB
TILE = 1024  # hashes compared at once on each side of a tile (memory: a few TILE x TILE int64 arrays)
RANK_BITS = 40  # a best is kept as distance << RANK_BITS | rank


def bands(t: int) -> list[tuple[int, int]]:
    """``t + 1`` disjoint bands of the 64 bits as (shift, width), widths as even as they divide."""
    n = min(t + 1, 64)
    widths = [64 // n + (1 if i < 64 % n else 0) for i in range(n)]
    shifts = np.concatenate([[0], np.cumsum(widths)[:-1]]).tolist()
    return [(int(s), int(w)) for s, w in zip(shifts, widths)]


def _band_value(h: np.ndarray, shift: int, width: int) -> np.ndarray:
    return (h >> np.uint64(shift)) & np.uint64((1 << width) - 1)


@dataclass
class BandTask:
    """Compare the members of the buckets in ``<folder>/bands_<task>.npy`` (rows: band, value, hash, rank)."""

    out: str
    folder: str
    task: int
    max_distance: int


def run_band_task(task: BandTask) -> dict:
    """Write ``best_<task>.npy`` (rank of j, rank of its best i, distance) for the hashes that have a
    better-ranked hash within ``max_distance`` in a shared bucket. Idempotent."""
    out = OutputDir(task.out)
    rows = load_npy(out, f"{task.folder}/bands_{task.task:05d}.npy")
    band, value = rows[0], rows[1]
    h, rank = rows[2].view(np.uint64), rows[3]
    spec = bands(task.max_distance)
    starts = np.flatnonzero(np.concatenate([[True], (band[1:] != band[:-1]) | (value[1:] != value[:-1])]))
    stops = np.concatenate([starts[1:], [len(band)]])
    found, pairs = [], 0
    for lo, hi in zip(starts.tolist(), stops.tolist()):
        if hi - lo < 2:
            continue
        best, n = _bucket(h[lo:hi], task.max_distance, spec[: int(band[lo])])
        pairs += n
        j = np.flatnonzero(best != np.iinfo(np.int64).max)
        if len(j):
            members = rank[lo:hi]
            found.append(np.stack([members[j], members[best[j] & ((1 << RANK_BITS) - 1)], best[j] >> RANK_BITS]))
    result = np.concatenate(found, axis=1) if found else np.zeros((3, 0), np.int64)
    save_npy(out, f"{task.folder}/best_{task.task:05d}.npy", result.astype(np.int64))
    mark_done(out, task.folder, "band", f"{task.task:05d}", {"pairs": pairs})
    return {"task": task.task, "pairs": pairs, "found": int(result.shape[1])}


def _bucket(h: np.ndarray, t: int, earlier: list[tuple[int, int]]) -> tuple[np.ndarray, int]:
    """Members ``h`` of one bucket, best rank first: per member, distance << RANK_BITS | the position of
    its best better-ranked member within ``t`` (int64 max: none), and the pairs compared."""
    m = len(h)
    best = np.full(m, np.iinfo(np.int64).max, dtype=np.int64)
    pos = np.arange(m, dtype=np.int64)
    pairs = 0
    for j0 in range(0, m, TILE):
        j1 = min(j0 + TILE, m)
        for i0 in range(0, j1, TILE):
            i1 = min(i0 + TILE, j1)
            x = h[j0:j1, None] ^ h[None, i0:i1]
            ok = pos[j0:j1, None] > pos[None, i0:i1]
            for shift, width in earlier:  # agreeing on an earlier band: that band's bucket compares them
                ok &= _band_value(x, shift, width) != 0
            pairs += int(np.count_nonzero(ok))
            d = np.bitwise_count(x)
            ok &= d <= t
            if not ok.any():
                continue
            key = np.where(ok, (d.astype(np.int64) << RANK_BITS) | pos[None, i0:i1], np.iinfo(np.int64).max)
            np.minimum(best[j0:j1], key.min(axis=1), out=best[j0:j1])
    return best, pairs


def near_duplicates(codes: np.ndarray, max_distance: int, *, out: OutputDir, folder: str, engine=None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """``codes`` (int64 hashes, best-ranked first): (duplicates, the index kept for each, Hamming
    distance), sorted by duplicate, and counts (distinct hashes, tasks, pairs compared).

    Scratch files go under ``out/folder``; ``engine.map_tasks`` runs the band tasks (here without one).
    """
    u = np.ascontiguousarray(codes, dtype=np.int64).view(np.uint64)
    n = len(u)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), {"distinct": n, "tasks": 0, "pairs": 0}
    distinct, first, inverse = np.unique(u, return_index=True, return_inverse=True)
    first = first.astype(np.int64)
    same = np.flatnonzero(first[inverse] != np.arange(n))  # identical to a better-ranked hash: distance 0
    dup, kept, dist = [same], [first[inverse[same]]], [np.zeros(len(same), np.int64)]
    stats = {"distinct": len(distinct), "tasks": 0, "pairs": 0}
    if max_distance > 0 and len(distinct) > 1:
        order = np.argsort(first, kind="stable")  # distinct hashes in rank order
        h, rank = distinct[order], first[order]
        tasks, pending, held = [], [], 0

        def flush() -> None:  # one task file of the pending (band, value)-sorted rows
            save_npy(out, f"{folder}/bands_{len(tasks):05d}.npy", np.concatenate(pending, axis=1))
            tasks.append(BandTask(out.url, folder, len(tasks), max_distance))
            pending.clear()

        for b, (shift, width) in enumerate(bands(max_distance)):  # one band's rows in memory at a time
            v = _band_value(h, shift, width).astype(np.int64)
            o = np.argsort(v, kind="stable")  # by value, then rank
            rows = np.stack([np.full(len(h), b, np.int64), v[o], h[o].view(np.int64), rank[o]])
            del v, o
            cuts = _cuts(rows[0], rows[1])
            for lo, hi in itertools.pairwise(cuts):
                if pending and held + (hi - lo) > TASK_ROWS:
                    flush()
                    held = 0
                pending.append(rows[:, lo:hi])
                held += hi - lo
            del rows
        flush()
        todo = [t for t in tasks if not is_done(out, folder, "band", f"{t.task:05d}")]  # a resumed run skips done ones
        if engine is None:
            for task in todo:
                run_band_task(task)
        elif todo:
            engine.map_tasks(run_band_task, todo, name="phash-bands")
        stats.update(tasks=len(tasks), pairs=sum(read_mark(out, folder, "band", f"{t.task:05d}")["pairs"] for t in tasks))
        best = np.concatenate([load_npy(out, f"{folder}/best_{t.task:05d}.npy") for t in tasks], axis=1)
        if best.shape[1]:
            o = np.lexsort((best[1], best[2], best[0]))  # per duplicate: lowest distance, then best rank
            best = best[:, o]
            head = np.concatenate([[True], best[0, 1:] != best[0, :-1]])
            dup.append(best[0, head])
            kept.append(best[1, head])
            dist.append(best[2, head])
        out.remove(folder)
    dup, kept, dist = np.concatenate(dup), np.concatenate(kept), np.concatenate(dist)
    o = np.argsort(dup, kind="stable")
    return dup[o], kept[o], dist[o], stats


def _cuts(band: np.ndarray, value: np.ndarray) -> list[int]:
    """Row offsets cutting the (band, value)-sorted rows into task files of about ``TASK_ROWS`` rows,
    never inside a bucket."""
    n = len(band)
    n_tasks = max(1, math.ceil(n / TASK_ROWS))
    boundaries = np.flatnonzero(np.concatenate([[True], (band[1:] != band[:-1]) | (value[1:] != value[:-1])]))
    cuts = [0]
    for k in range(1, n_tasks):
        at = int(boundaries[min(np.searchsorted(boundaries, k * n // n_tasks), len(boundaries) - 1)])
        if at > cuts[-1]:
            cuts.append(at)
    cuts.append(n)
    return cuts
