"""Key ranks of a curation's samples: one task per input shard scans its keys (saved as a
memory-mapped array) and measures its samples; runs of shards whose key ranges overlap get their
ranks from one merge task each (see ``mmdata.curate.parts`` for why), elsewhere the rank is the
global position."""
from __future__ import annotations

import numpy as np

from mmdata.arrow import parquet_table
from mmdata.curate.parts import ShardTask, build_table
from mmdata.curate.vectors import open_scratch, save_npy
from mmdata.storage import OutputDir


def _scan(task: ShardTask, out: OutputDir) -> dict:
    """Keys of the shard as a memory-mapped array; its row count, lowest and highest key, whether sorted."""
    keys = build_table(task, ["key"]).column("key").to_pylist()
    arr = np.asarray([k.encode() for k in keys], dtype=bytes) if keys else np.zeros(0, "S1")
    save_npy(out, f"{task.folder}/keys/{task.shard}.npy", arr)
    return {"rows": len(keys), "low": min(keys) if keys else None, "high": max(keys) if keys else None,
            "sorted": all(a < b for a, b in zip(keys, keys[1:]))}


def _measure(task: ShardTask, out: OutputDir) -> dict:
    """The scan, then the shard's measures (``mmdata.curate.features``) unless a resumed run has them."""
    from mmdata.curate.features import run_feature_task
    from mmdata.curate.markers import is_done

    result = _scan(task, out)
    if not is_done(out, task.folder, "measure", task.shard):
        run_feature_task(task.args["features"])
    result["digests"] = {m: int(open_scratch(task.out, f"{task.folder}/exact/{m}/{task.shard}.npy").shape[0])
                         for m in task.args["features"].exact}  # exact dedup skips a modality without any
    return result


def rank_groups(scans: list[dict]) -> list[list[int]]:
    """Shards (indices) in runs whose key ranges overlap: every key of a run is above every key of
    the runs before it, so a key's rank is the rows before its run plus its rank inside the run. (A
    shard whose lowest key is below an earlier shard's makes one run of everything: still exact.)"""
    lows = [s["low"] for s in scans if s["rows"]]
    if any(b <= a for a, b in zip(lows, lows[1:])):
        return [list(range(len(scans)))]
    groups: list[list[int]] = []
    high = None
    for i, s in enumerate(scans):
        if groups and (not s["rows"] or high is None or s["low"] <= high):
            groups[-1].append(i)
        else:
            groups.append([i])
        if s["rows"]:
            high = s["high"] if high is None or s["high"] > high else high
    return groups


def needs_merge(group: list[int], scans: list[dict]) -> bool:
    return sum(1 for i in group if scans[i]["rows"]) > 1 or not all(scans[i]["sorted"] for i in group)


def _rank(task: ShardTask, out: OutputDir) -> dict:
    """Key ranks of a group of shards whose key ranges overlap: one stable sort of their keys."""
    build = OutputDir(task.build)
    keys, sizes = [], []
    for shard in task.args["shards"]:
        k = parquet_table(build.read_bytes(f"shards/{shard}.parquet"), columns=["key"],
                          use_threads=False).column("key").to_pylist()
        keys += k
        sizes.append(len(k))
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = task.args["base"] + np.arange(len(order))
    start = 0
    for shard, n in zip(task.args["shards"], sizes):
        save_npy(out, f"{task.folder}/rank/{shard}.npy", rank[start:start + n])
        start += n
    return {"rows": len(keys)}


STEPS = {"scan": _scan, "measure": _measure, "rank": _rank}
