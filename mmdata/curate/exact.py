"""Exact duplicates (same source bytes, same normalised caption) grouped on the engine, by hash bucket.

The measure task of each input shard writes, per modality, ``<folder>/<modality>/<shard>.npy``: one
row per measured sample with a value — (bucket, row in the shard, 256-bit digest of the value as four
int64) — sorted by bucket. Before each modality's round the driver saves the key rank of every
candidate (-1: not a candidate) as one memory-mapped file; an engine task per bucket reads its
slice of every shard file, keeps the candidates (``<cand>/<shard>.npy``: per row of the shard its key
rank, -1 when not a candidate, memory-mapped), and names each group's best-ranked member as the one
kept. A task holds its bucket only, never the corpus; its result file holds (duplicate, kept, score)
over global positions, sorted by duplicate, for the per-shard tasks that apply it.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

import numpy as np

from mmdata.curate.markers import is_done, mark_done
from mmdata.curate.vectors import load_npy, open_scratch, save_npy
from mmdata.storage import OutputDir

BUCKET_ROWS = 1 << 21  # candidates per bucket task, about (48 bytes each)
MODALITIES = ("image", "text", "audio")


def n_buckets(rows: int) -> int:
    """Hash buckets for ``rows`` rows (two at least: a single task would run in the driver's process)."""
    # tests only: MMDATA_TEST_CURATE_BUCKET_ROWS gives a small build several buckets (the result does not depend on it)
    return max(2, math.ceil(rows / bucket_rows()))


def bucket_rows() -> int:
    return int(os.environ.get("MMDATA_TEST_CURATE_BUCKET_ROWS") or BUCKET_ROWS)


def digest_rows(positions: list[int], values: list[str], buckets: int) -> np.ndarray:
    """(bucket, position, digest as 4 x int64) rows for the truthy ``values``, sorted by bucket then position."""
    pairs = [(p, hashlib.sha256(v.encode()).digest()) for p, v in zip(positions, values) if v]
    rows = np.zeros((len(pairs), 6), dtype=np.int64)
    if pairs:
        rows[:, 1] = [p for p, _ in pairs]
        rows[:, 2:] = np.frombuffer(b"".join(d for _, d in pairs), dtype=np.int64).reshape(-1, 4)
        rows[:, 0] = (rows[:, 2].view(np.uint64) % np.uint64(buckets)).astype(np.int64)
        rows = rows[np.lexsort((rows[:, 1], rows[:, 0]))]
    return rows


@dataclass
class ExactTask:
    out: str
    folder: str
    modality: str
    bucket: int
    shards: list[str]
    cand: str = ""  # folder of the per-shard candidate ranks


def result_rel(folder: str, modality: str, bucket: int) -> str:
    return f"{folder}/{modality}_result_{bucket:05d}.npy"


def run_exact_task(task: ExactTask) -> dict:
    """Write ``<modality>_result_<bucket>.npy``: (duplicate position, kept position, score 1.0 as float64
    bits) over the build's positions, sorted by duplicate."""
    out = OutputDir(task.out)
    offsets = load_npy(out, f"{task.folder}/offsets.npy")
    parts = []
    for i, shard in enumerate(task.shards):
        rel = f"{task.folder}/{task.modality}/{shard}.npy"
        if not out.exists(rel):
            continue
        rows = open_scratch(task.out, rel)
        lo, hi = np.searchsorted(rows[:, 0], [task.bucket, task.bucket + 1])
        if hi > lo:
            mine = np.array(rows[lo:hi])
            pos = offsets[i] + mine[:, 1]
            r = np.asarray(open_scratch(task.out, f"{task.cand}/{shard}.npy")[mine[:, 1]])
            keep = r >= 0
            parts.append(np.column_stack([mine[keep, 2:], r[keep], pos[keep]]))
    found = np.concatenate(parts) if parts else np.zeros((0, 6), np.int64)
    o = np.lexsort((found[:, 4], found[:, 3], found[:, 2], found[:, 1], found[:, 0]))  # by digest, then rank
    found = found[o]
    same = np.all(found[1:, :4] == found[:-1, :4], axis=1) if len(found) else np.zeros(0, bool)
    head = np.concatenate([[True], ~same]) if len(found) else np.zeros(0, bool)
    group = np.cumsum(head) - 1
    first = found[head, 5]
    dup = ~head
    result = np.stack([found[dup, 5], first[group[dup]]]) if len(found) else np.zeros((2, 0), np.int64)
    result = result[:, np.argsort(result[0], kind="stable")]
    score = np.ones(result.shape[1], dtype=np.float64).view(np.int64)
    save_npy(out, result_rel(task.folder, task.modality, task.bucket), np.vstack([result, score[None]]).astype(np.int64))
    mark_done(out, task.folder, f"exact_{task.modality}", f"{task.bucket:05d}", {"duplicates": int(result.shape[1])})
    return {"bucket": task.bucket, "duplicates": int(result.shape[1])}


def exact_tasks(out: OutputDir, folder: str, modality: str, shards: list[str], buckets: int, cand: str,
                engine=None) -> list[str]:
    """Run the bucket tasks of one modality over the candidates in ``<cand>/<shard>.npy``; their result files."""
    tasks = [ExactTask(out.url, folder, modality, b, shards, cand) for b in range(buckets)]
    todo = [t for t in tasks if not is_done(out, folder, f"exact_{modality}", f"{t.bucket:05d}")]
    if engine is None:
        for task in todo:
            run_exact_task(task)
    elif todo:
        engine.map_tasks(run_exact_task, todo, name=f"exact-{modality}")
    return [result_rel(folder, modality, t.bucket) for t in tasks]


def exact_round(out: OutputDir, folder: str, modality: str, rank: np.ndarray, shards: list[str],
                buckets: int, engine=None) -> tuple[np.ndarray, np.ndarray]:
    """(duplicates, the position kept for each) among the candidates (``rank`` ≥ 0, over the global
    positions of ``<folder>/offsets.npy``), sorted by duplicate: ``exact_tasks`` in one call."""
    offsets = load_npy(out, f"{folder}/offsets.npy")
    for i, shard in enumerate(shards):
        save_npy(out, f"{folder}/cand_{modality}/{shard}.npy", np.asarray(rank[offsets[i]:offsets[i + 1]], np.int64))
    files = exact_tasks(out, folder, modality, shards, buckets, f"{folder}/cand_{modality}", engine)
    res = np.concatenate([load_npy(out, f) for f in files], axis=1)
    res = res[:, np.argsort(res[0], kind="stable")]
    return res[0], res[1]
