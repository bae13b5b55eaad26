"""The curated shards' plans: each duplicate's kept key resolved through the other shards' maps,
the rows of a run of shards cut into curated shards by the kept counts before them, and a curated
shard's pieces joined."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmdata.arrow import parquet_table
from mmdata.curate.parts import ShardTask, read_part, shard_names, shard_of
from mmdata.curate.vectors import load_npy, open_scratch
from mmdata.storage import OutputDir


def _lookup(out: OutputDir, folder: str, name: str, shards: list[str], offsets: np.ndarray, positions: np.ndarray):
    """``<folder>/<name>/<shard>.npy`` at global ``positions``, read shard by shard from the maps."""
    result = None
    where = shard_of(offsets, positions)
    for s in np.unique(where).tolist():
        sel = np.flatnonzero(where == s)
        vals = np.asarray(open_scratch(out.url, f"{folder}/{name}/{shards[s]}.npy")[positions[sel] - offsets[s]])
        if result is None:
            result = np.empty(len(positions), dtype=vals.dtype) if vals.dtype.kind != "S" else np.empty(len(positions), dtype=object)
        result[sel] = vals
    return result if result is not None else np.zeros(0, np.int64)


def resolve(out: OutputDir, folder: str, part: dict, shards: list[str]) -> int:
    """Name, for each duplicate of the part, the sample that stays: the kept sample, or while that
    one is removed the sample kept for it, and so on (chains end: each link is to a better-ranked or
    earlier-kept sample). Looks ``next`` and ``keys`` up in the other shards' maps."""
    dups = np.asarray([p for p, m in enumerate(part["method"]) if m is not None], dtype=np.int64)
    if not len(dups):
        return 0
    offsets = load_npy(out, f"{folder}/offsets.npy")
    k = part["kept_for"][dups].copy()
    rounds = 0
    while True:
        nxt = _lookup(out, folder, "next", shards, offsets, k).astype(np.int64)
        move = nxt >= 0
        if not move.any() or rounds > len(offsets):
            break
        k[move] = nxt[move]
        rounds += 1
    keys = _lookup(out, folder, "keys", shards, offsets, k)
    for d, key in zip(dups.tolist(), keys.tolist()):
        key = key.decode()
        part["reason"][d] = f"duplicate:{part['method'][d]}:{key}"
        part["duplicate_of"][d] = key
    return rounds


def _pieces(task: ShardTask, out: OutputDir) -> dict:
    """A run of shards (``args.shards``: their names), in key order, cut into the curated shards: the
    n-th kept sample (from ``args.kept_before``) goes to shard n // per_shard, a removed one beside the
    kept sample before it. Writes ``pieces/<curated shard>_<run>.parquet`` (the plan's schema); returns
    the curated shards touched and the removed samples by summary reason."""
    from mmdata.curate.decide import SCORE_COLUMNS
    from mmdata.curate.write import PLAN_SCHEMA, summary_reason

    a = task.args
    cols = ["status", "reason", *SCORE_COLUMNS]
    merged: dict = {c: [] for c in cols}
    shard_col, pos_col, ranks, built = [], [], [], []
    for name in a["shards"]:
        part = read_part(out, task.folder, name)
        resolve(out, task.folder, part, shard_names(out, task.folder))
        for c in cols:
            merged[c] += part[c]
        shard_col += [name] * len(part["pos"])
        pos_col += part["pos"]
        ranks.append(part["rank"])
        built += part["built"]
    order = np.argsort(np.concatenate(ranks) if ranks else np.zeros(0, np.int64), kind="stable")
    written = np.asarray(merged["status"], dtype=object)[order] == "written"
    before = a["kept_before"] + np.cumsum(written) - written  # kept samples before each row
    target = np.where(written, before, np.maximum(before - 1, 0)) // a["per_shard"]
    removed: dict[str, int] = {}
    for p in np.flatnonzero(np.asarray(built, dtype=bool) & (np.asarray(merged["status"], dtype=object) != "written")).tolist():
        r = summary_reason(merged["reason"][p])
        removed[r] = removed.get(r, 0) + 1
    outs = []
    for t in np.unique(target).tolist():
        rows = order[target == t].tolist()
        columns = {"in_shard": pa.array([shard_col[p] for p in rows], pa.string()),
                   "in_pos": pa.array([pos_col[p] for p in rows], pa.int32()),
                   **{c: pa.array([merged[c][p] for p in rows], PLAN_SCHEMA.field(c).type) for c in cols}}
        buf = io.BytesIO()
        pq.write_table(pa.table(columns, schema=PLAN_SCHEMA), buf, compression="zstd")
        out.write_bytes(f"{task.folder}/pieces/{t:05d}_{task.index:05d}.parquet", buf.getvalue())
        outs.append(int(t))
    return {"outs": outs, "removed": removed}


def _assemble(task: ShardTask, out: OutputDir) -> dict:
    """The plan of curated shard ``task.shard``: its pieces (``args.runs``) in key order."""
    from mmdata.curate.write import PLAN_SCHEMA

    tables = [parquet_table(out.read_bytes(f"{task.folder}/pieces/{task.shard}_{r:05d}.parquet"),
                            use_threads=False) for r in task.args["runs"]]
    table = pa.concat_tables(tables) if tables else PLAN_SCHEMA.empty_table()
    buf = io.BytesIO()
    pq.write_table(table.combine_chunks(), buf, compression="zstd")
    out.write_bytes(f"{task.folder}/units/{task.shard}.parquet", buf.getvalue())
    return {"rows": table.num_rows}


STEPS = {"pieces": _pieces, "assemble": _assemble}
