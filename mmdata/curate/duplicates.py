"""Duplicates into the parts: a dedup method's (duplicate, kept, score) files applied to each shard's
part, the ``next`` map for the kept-key resolution, and the perceptual dedup's per-shard source."""
from __future__ import annotations

import numpy as np

from mmdata.curate.parts import ShardTask, read_part, write_cand, write_part
from mmdata.curate.vectors import load_npy, open_scratch, save_npy
from mmdata.storage import OutputDir

MAX_PIXELS = 2**31 - 1  # pHash order: (more source pixels, then key rank) packed as one int64


def _apply(task: ShardTask, out: OutputDir) -> dict:
    """Mark this shard's duplicates found by a method: files (3, n) of (duplicate, kept, score) over
    global positions, sorted by duplicate; each read only where this shard's positions lie."""
    part = read_part(out, task.folder, task.shard)
    n = len(part["pos"])
    for rel in task.args["files"]:
        res = open_scratch(task.out, rel)
        lo, hi = np.searchsorted(res[0], [task.offset, task.offset + n])
        if hi <= lo:
            continue
        mine = np.array(res[:, lo:hi])
        scores = 1.0 - mine[2] / 64.0 if task.args.get("distance") else mine[2].view(np.float64)  # pHash: a distance
        for d, k, s in zip((mine[0] - task.offset).tolist(), mine[1].tolist(), scores.tolist()):
            part["status"][d] = "filtered"
            part["kept_for"][d] = k
            part["method"][d] = task.args["method"]
            part["duplicate_score"][d] = float(np.float32(s))
    write_part(out, task.folder, task.shard, part)
    _next(task, out, part)
    return {"written": write_cand(out, task.folder, task.shard, part)}


def _phash_source(task: ShardTask, out: OutputDir) -> dict:
    """The shard's candidates with a pHash as a source of ``mmdata.curate.phash.rounds``: order key
    (more source pixels first, then key rank), global position, hash."""
    from mmdata.curate.phash import write_source

    part = read_part(out, task.folder, task.shard)
    cand = load_npy(out, f"{task.folder}/cand/{task.shard}.npy")
    p = np.asarray([i for i in np.flatnonzero(cand >= 0).tolist() if part["phash_code"][i] is not None], dtype=np.int64)
    order = ((MAX_PIXELS - np.minimum(part["pixels"][p], MAX_PIXELS)) << 32) | part["rank"][p]
    codes = np.asarray([part["phash_code"][i] for i in p.tolist()], dtype=np.int64)
    write_source(out, task.args["folder"], task.shard, order, task.offset + p, codes, task.args["buckets"])
    return {"n": len(p)}


def _next(task: ShardTask, out: OutputDir, part: dict) -> None:
    """``next/<shard>.npy``: for a removed duplicate, the position kept for it; else -1."""
    gone = np.asarray([s != "written" for s in part["status"]], dtype=bool)
    save_npy(out, f"{task.folder}/next/{task.shard}.npy", np.where(gone & (part["kept_for"] >= 0), part["kept_for"], -1))


STEPS = {"apply": _apply, "phash_source": _phash_source}
