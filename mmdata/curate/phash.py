"""Perceptual-hash near duplicates without an all-pairs search: multi-index hashing on the engine.

Pigeonhole: two 64-bit hashes within Hamming distance ``t`` agree exactly on at least one of ``t + 1``
disjoint bands of their bits. So:

1. the hashes, spread by hash over buckets (one source file per input shard, written by its task),
   are collapsed per bucket first (``IdentTask``: a duplicate of the best-ranked holder of its hash,
   distance 0): a thousand blank images (all-zero hashes) cost a sort, not a million comparisons;
2. every distinct hash is listed once per band under that band's value, spread by (band, value) over
   band buckets (about ``TASK_ROWS`` rows each; one (band, value) never split), so a task holds its
   buckets only, never the corpus;
3. a band task (``BandTask``) compares the members of each (band, value) pairwise in tiles (exact
   Hamming, bounded memory), skipping pairs that already agree on an earlier band (that band's
   bucket has them), and keeps, per hash, the best better-ranked hash within ``t``: lowest distance,
   then best rank;
4. a task per bucket of duplicates (``NearTask``) keeps each one's best over the band tasks (the
   minimum over buckets is the minimum over all pairs).

Hashes are ranked by an int64 order key (lower first) and named by an int64 position; results are
(duplicate, kept, distance) files sorted by duplicate. No step gathers the hashes in one place.

The result is the all-pairs rule: sample j (in rank order) is a duplicate of the better-ranked i
within ``t`` with the lowest (distance, i), whether or not i is itself a duplicate.
"""
from __future__ import annotations

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


def _mix(v: np.ndarray) -> np.ndarray:
    """A well-spread uint64 of each value (for hash partitioning)."""
    x = np.asarray(v).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return x ^ (x >> np.uint64(29))


def _slice(out: OutputDir, rel: str, bucket: int) -> np.ndarray:
    """The columns of the rows of ``rel`` (rows sorted by their first value, the bucket) in ``bucket``."""
    from mmdata.curate.vectors import open_scratch

    rows = open_scratch(out.url, rel)
    lo, hi = np.searchsorted(rows[0], [bucket, bucket + 1])
    return np.array(rows[:, lo:hi])


def write_source(out: OutputDir, folder: str, name: str, order: np.ndarray, pos: np.ndarray, codes: np.ndarray,
                 buckets: int) -> None:
    """``src/<name>.npy``: the hashes of one input shard (their order key: lower is better-ranked, and
    their position), by hash bucket."""
    codes = np.asarray(codes, dtype=np.int64)
    b = (_mix(codes.view(np.uint64)) % np.uint64(buckets)).astype(np.int64)
    rows = np.stack([b, np.asarray(order, np.int64), np.asarray(pos, np.int64), codes])
    save_npy(out, f"{folder}/src/{name}.npy", rows[:, np.lexsort((rows[1], rows[0]))])


@dataclass
class IdentTask:
    """Hash bucket ``bucket`` of the sources: identical hashes collapsed, the distinct ones listed per band."""

    out: str
    folder: str
    bucket: int
    sources: list[str]
    max_distance: int
    band_buckets: int


def run_ident_task(task: IdentTask) -> dict:
    """Write ``ident_<bucket>.npy`` (3, n): duplicate, kept, distance 0, sorted by duplicate; and
    ``bandsrc_<bucket>.npy``: per distinct hash and band (band bucket, band, value, hash, order, position)."""
    out = OutputDir(task.out)
    parts = [_slice(out, f"{task.folder}/src/{s}.npy", task.bucket) for s in task.sources]
    rows = np.concatenate(parts, axis=1) if parts else np.zeros((4, 0), np.int64)
    rows = rows[:, np.lexsort((rows[1], rows[3]))]  # by hash, then order
    order, pos, code = rows[1], rows[2], rows[3]
    head = np.concatenate([[True], code[1:] != code[:-1]]) if len(code) else np.zeros(0, bool)
    first = pos[head][np.cumsum(head) - 1]
    same = np.stack([pos[~head], first[~head], np.zeros(int((~head).sum()), np.int64)])
    save_npy(out, f"{task.folder}/ident_{task.bucket:05d}.npy", same[:, np.argsort(same[0], kind="stable")])
    if task.max_distance > 0:
        h = code[head].view(np.uint64)
        blocks = []
        for b, (shift, width) in enumerate(bands(task.max_distance)):
            v = _band_value(h, shift, width).astype(np.int64)
            bb = (_mix(v.view(np.uint64) * np.uint64(64) + np.uint64(b)) % np.uint64(task.band_buckets)).astype(np.int64)
            blocks.append(np.stack([bb, np.full(len(h), b, np.int64), v, h.view(np.int64), order[head], pos[head]]))
        rows = np.concatenate(blocks, axis=1)
        save_npy(out, f"{task.folder}/bandsrc_{task.bucket:05d}.npy", rows[:, np.argsort(rows[0], kind="stable")])
    mark_done(out, task.folder, "ident", f"{task.bucket:05d}", {"distinct": int(head.sum()), "duplicates": int((~head).sum())})
    return {"distinct": int(head.sum())}


@dataclass
class BandTask:
    """Band bucket ``task``: the buckets (band, value) whose hash falls in it, compared pairwise."""

    out: str
    folder: str
    task: int
    max_distance: int
    sources: int = 0  # hash buckets (``bandsrc_<b>.npy``)
    near_buckets: int = 1


def run_band_task(task: BandTask) -> dict:
    """Write ``best_<task>.npy``: per hash with a better-ranked hash within ``max_distance`` in a shared
    bucket (near bucket, its position, distance, the better one's order and position), by near bucket."""
    out = OutputDir(task.out)
    parts = [_slice(out, f"{task.folder}/bandsrc_{s:05d}.npy", task.task) for s in range(task.sources)]
    rows = np.concatenate(parts, axis=1) if parts else np.zeros((6, 0), np.int64)
    rows = rows[:, np.lexsort((rows[4], rows[2], rows[1]))]  # by band, value, then order
    band, value, h, order, pos = rows[1], rows[2], rows[3].view(np.uint64), rows[4], rows[5]
    spec = bands(task.max_distance)
    starts = np.flatnonzero(np.concatenate([[True], (band[1:] != band[:-1]) | (value[1:] != value[:-1])])) if len(band) \
        else np.zeros(0, np.int64)
    stops = np.concatenate([starts[1:], [len(band)]]).astype(np.int64)
    found, pairs = [], 0
    for lo, hi in zip(starts.tolist(), stops.tolist()):
        if hi - lo < 2:
            continue
        best, n = _bucket(h[lo:hi], task.max_distance, spec[: int(band[lo])])
        pairs += n
        j = np.flatnonzero(best != np.iinfo(np.int64).max)
        if len(j):
            i = lo + (best[j] & ((1 << RANK_BITS) - 1))
            found.append(np.stack([pos[lo + j], best[j] >> RANK_BITS, order[i], pos[i]]))
    res = np.concatenate(found, axis=1) if found else np.zeros((4, 0), np.int64)
    nb = (_mix(res[0].view(np.uint64)) % np.uint64(task.near_buckets)).astype(np.int64)
    res = np.vstack([nb[None], res])
    save_npy(out, f"{task.folder}/best_{task.task:05d}.npy", res[:, np.argsort(res[0], kind="stable")])
    mark_done(out, task.folder, "band", f"{task.task:05d}", {"pairs": pairs})
    return {"task": task.task, "pairs": pairs, "found": int(res.shape[1])}


@dataclass
class NearTask:
    out: str
    folder: str
    bucket: int
    sources: int  # band tasks


def run_near_task(task: NearTask) -> dict:
    """Write ``near_<bucket>.npy`` (3, n): per duplicate its best (lowest distance, then best-ranked)."""
    out = OutputDir(task.out)
    parts = [_slice(out, f"{task.folder}/best_{s:05d}.npy", task.bucket) for s in range(task.sources)]
    best = np.concatenate(parts, axis=1) if parts else np.zeros((5, 0), np.int64)
    best = best[:, np.lexsort((best[3], best[2], best[1]))]  # per duplicate: lowest distance, then best order
    head = np.concatenate([[True], best[1, 1:] != best[1, :-1]]) if best.shape[1] else np.zeros(0, bool)
    save_npy(out, f"{task.folder}/near_{task.bucket:05d}.npy", np.stack([best[1, head], best[4, head], best[2, head]]))
    mark_done(out, task.folder, "near", f"{task.bucket:05d}", {"duplicates": int(head.sum())})
    return {}


def rounds(out: OutputDir, folder: str, sources: list[str], rows: int, max_distance: int, engine=None
           ) -> tuple[list[str], dict]:
    """The engine rounds over the source files (``write_source``, ``buckets(rows)`` hash buckets):
    identical hashes, band buckets, best per duplicate. Returns the result files ((3, n): duplicate,
    kept, distance; sorted by duplicate) and counts (distinct hashes, band tasks, pairs compared)."""

    def run(fn, items, name, stage, key):
        todo = [t for t in items if not is_done(out, folder, stage, f"{key(t):05d}")]  # a resumed run skips done ones
        if engine is None:
            for t in todo:
                fn(t)
        elif todo:
            engine.map_tasks(fn, todo, name=name)
        return [read_mark(out, folder, stage, f"{key(t):05d}") for t in items]

    n_hash = buckets(rows)
    n_band = max(2, math.ceil(rows * len(bands(max_distance)) / TASK_ROWS))
    marks = run(run_ident_task, [IdentTask(out.url, folder, b, sources, max_distance, n_band) for b in range(n_hash)],
                "phash-identical", "ident", lambda t: t.bucket)
    files = [f"{folder}/ident_{b:05d}.npy" for b in range(n_hash)]
    stats = {"distinct": sum(m["distinct"] for m in marks), "tasks": 0, "pairs": 0,
             "duplicates": sum(m["duplicates"] for m in marks)}
    if max_distance > 0 and stats["distinct"] > 1:
        marks = run(run_band_task, [BandTask(out.url, folder, t, max_distance, n_hash, n_hash) for t in range(n_band)],
                    "phash-bands", "band", lambda t: t.task)
        stats.update(tasks=n_band, pairs=sum(m["pairs"] for m in marks))
        marks = run(run_near_task, [NearTask(out.url, folder, b, n_band) for b in range(n_hash)], "phash-near", "near",
                    lambda t: t.bucket)
        stats["duplicates"] += sum(m["duplicates"] for m in marks)
        files += [f"{folder}/near_{b:05d}.npy" for b in range(n_hash)]
    return files, stats


def buckets(rows: int) -> int:
    """Hash buckets of a pHash round over ``rows`` hashes at most (two at least: the tasks run off the driver)."""
    return max(2, math.ceil(rows / TASK_ROWS))


def near_duplicates(codes: np.ndarray, max_distance: int, *, out: OutputDir, folder: str, engine=None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """``codes`` (int64 hashes, best-ranked first): (duplicates, the index kept for each, Hamming
    distance), sorted by duplicate, and counts (distinct hashes, tasks, pairs compared): ``rounds``
    over one source. Scratch files go under ``out/folder`` (removed after); ``engine.map_tasks`` runs
    the tasks (here without one)."""
    n = len(codes)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), {"distinct": n, "tasks": 0, "pairs": 0}
    idx = np.arange(n, dtype=np.int64)
    write_source(out, folder, "all", idx, idx, codes, buckets(n))
    files, stats = rounds(out, folder, ["all"], n, max_distance, engine)
    res = np.concatenate([load_npy(out, f) for f in files], axis=1)
    res = res[:, np.argsort(res[0], kind="stable")]
    out.remove(folder)
    return res[0], res[1], res[2], stats
