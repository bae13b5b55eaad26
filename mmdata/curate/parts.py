"""The decision state of a curation, on disk: one part per input shard, rewritten by engine tasks.

``<scratch>/parts/<shard>.parquet`` holds one row per row of the input shard's table (``pos``), with
its key rank, status, reason, the measures and scores of the curated table, and for a duplicate the
global position of the sample kept for it (``kept_for``) and the method. A sample's global position
is its shard's offset plus ``pos``. Beside the parts, per shard, memory-mapped arrays the other
shards' tasks look rows up in: ``keys/<shard>.npy`` (the keys, utf-8 bytes), ``cand/<shard>.npy``
(per row: its key rank when it takes part in deduplication, else -1) and ``next/<shard>.npy`` (for
the kept-key resolution). The driver holds only per-shard counts and offsets.

Key rank: the build's plan sorts records by key and cuts units in key order, so the rows of a shard
table are in key order; but a view or segment key (``cat_v01``) sits in its parent's unit, so two
neighbouring shards' key ranges may overlap. Shards whose ranges overlap form a group whose ranks one
task merges (``run_rank_task``); elsewhere the rank is the global position.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmdata.curate.vectors import load_npy, open_rows, open_scratch, save_npy
from mmdata.storage import OutputDir

BUILD_COLUMNS = ["key", "status", "reason", "row", "orig_width", "orig_height", "view_of"]
MEASURES = ("language", "language_score", "words", "tokens", "speech_ratio", "loudness", "clipping")
MAX_PIXELS = 2**31 - 1  # pHash order: (more source pixels, then key rank) packed as one int64
HIST_BITS = 16


def _part_schema() -> pa.Schema:
    from mmdata.curate.write import CURATE_FIELDS

    return pa.schema([pa.field("pos", pa.int32()), pa.field("rank", pa.int64()), pa.field("status", pa.string()),
                      pa.field("reason", pa.string()), pa.field("built", pa.bool_()), pa.field("row", pa.int64()),
                      pa.field("pixels", pa.int64()), pa.field("view", pa.bool_()), pa.field("phash_code", pa.int64()),
                      pa.field("kept_for", pa.int64()), pa.field("method", pa.string())] + CURATE_FIELDS)


def read_part(out: OutputDir, folder: str, shard: str) -> dict:
    t = pq.read_table(io.BytesIO(out.read_bytes(f"{folder}/parts/{shard}.parquet")), use_threads=False)
    part = {name: t.column(name).to_pylist() for name in t.column_names}
    for name in ("rank", "row", "pixels", "kept_for"):
        part[name] = np.asarray(part[name], dtype=np.int64)
    return part


def write_part(out: OutputDir, folder: str, shard: str, part: dict) -> None:
    schema = _part_schema()
    columns = {f.name: pa.array(part[f.name].tolist() if isinstance(part[f.name], np.ndarray) else part[f.name], f.type)
               for f in schema}
    buf = io.BytesIO()
    pq.write_table(pa.table(columns, schema=schema), buf, compression="zstd")
    out.write_bytes(f"{folder}/parts/{shard}.parquet", buf.getvalue())


def write_cand(out: OutputDir, folder: str, shard: str, part: dict) -> int:
    """``cand/<shard>.npy``: per row its key rank when alive and not an augmented view, else -1."""
    ok = np.asarray([s == "written" and not v for s, v in zip(part["status"], part["view"])], dtype=bool)
    save_npy(out, f"{folder}/cand/{shard}.npy", np.where(ok, part["rank"], -1).astype(np.int64))
    return int(np.count_nonzero(np.asarray(part["status"], dtype=object) == "written"))


def ordered(scores: np.ndarray) -> np.ndarray:
    """float32 scores as uint32 in the same order (-0.0 as 0.0)."""
    b = (np.asarray(scores, dtype=np.float32) + np.float32(0)).view(np.uint32)
    return np.where(b >> np.uint32(31), ~b, b | np.uint32(1 << 31)).astype(np.uint32)


_NAMES: dict = {}


def shard_names(out: OutputDir, folder: str) -> list[str]:
    """The input shards' names (``<scratch>/shards.json``, saved once by the driver), read once per process."""
    import json

    key = (out.url, folder)
    if key not in _NAMES:
        _NAMES.clear()
        _NAMES[key] = json.loads(out.read_bytes(f"{folder}/shards.json"))
    return _NAMES[key]


def shard_of(offsets: np.ndarray, positions: np.ndarray) -> np.ndarray:
    return np.searchsorted(offsets, positions, side="right") - 1


@dataclass
class ShardTask:
    """One step of the decision over input shard ``shard`` (index ``index``, first global position ``offset``)."""

    build: str
    out: str
    folder: str
    shard: str
    index: int
    offset: int
    step: str
    args: dict = field(default_factory=dict)


def run_shard_task(task: ShardTask) -> dict:
    return STEPS[task.step](task, OutputDir(task.out))


def _build_table(task: ShardTask, columns: list[str]) -> pa.Table:
    build = OutputDir(task.build)
    t = pq.read_table(io.BytesIO(build.read_bytes(f"shards/{task.shard}.parquet")), use_threads=False)
    return t.select([c for c in columns if c in t.column_names])


def _scan(task: ShardTask, out: OutputDir) -> dict:
    """Keys of the shard as a memory-mapped array; its row count, lowest and highest key, whether sorted."""
    keys = _build_table(task, ["key"]).column("key").to_pylist()
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
        k = pq.read_table(io.BytesIO(build.read_bytes(f"shards/{shard}.parquet")), columns=["key"],
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


def _init(task: ShardTask, out: OutputDir) -> dict:
    """The part from the build's table and the measures: errors, CLIP score, ``clip_min``; the
    histogram of the CLIP scores (high bits) when a top fraction is asked for."""
    from mmdata.curate.features import load_features

    a = task.args
    t = _build_table(task, BUILD_COLUMNS)
    n = t.num_rows
    col = {c: (t.column(c).to_pylist() if c in t.column_names else [None] * n) for c in BUILD_COLUMNS}
    rank_rel = f"{task.folder}/rank/{task.shard}.npy"
    rank = load_npy(out, rank_rel) if a.get("ranked") else task.offset + np.arange(n, dtype=np.int64)
    row = np.asarray(pc.fill_null(t.column("row").cast(pa.int64()), -1).to_numpy(), dtype=np.int64) if n else np.zeros(0, np.int64)
    part = {"pos": list(range(n)), "rank": rank, "status": list(col["status"]), "reason": list(col["reason"]),
            "built": [s == "written" for s in col["status"]], "row": row,
            "pixels": np.asarray([(w or 0) * (h or 0) for w, h in zip(col["orig_width"], col["orig_height"])], dtype=np.int64),
            "view": [v is not None for v in col["view_of"]], "phash_code": [None] * n,
            "kept_for": np.full(n, -1, dtype=np.int64), "method": [None] * n}
    from mmdata.curate.decide import SCORE_COLUMNS

    for c in SCORE_COLUMNS:
        part[c] = [None] * n
    feats = load_features(out, task.folder, task.shard).to_pydict() if n else {"pos": []}
    errors = [None] * n
    for j, p in enumerate(feats["pos"]):
        for name in MEASURES:
            part[name][p] = feats[name][j]
        v = feats["phash"][j]
        part["phash_code"][p] = v
        part["phash"][p] = None if v is None else f"{v & (2**64 - 1):016x}"
        errors[p] = feats["error"][j]
    for p in range(n):
        if part["status"][p] == "written" and errors[p]:
            part["status"][p], part["reason"][p] = "failed", f"curate:{errors[p].split(':')[0]}"
    if a.get("clip"):
        _clip_scores(task, part)
        if a.get("clip_min") is not None:
            _threshold(part, "clip_score", "clip_score", a["clip_min"], None)
    result = {"rows": n, "scored": 0}
    if a.get("top"):
        keys = _scored_keys(part)[1]
        result["scored"] = len(keys)
        _save_hist(out, f"{task.folder}/clip/h1/{task.shard}.npy", keys >> np.uint32(HIST_BITS))
    elif a.get("filter") is not None:  # no global cut to wait for: the filters now
        result.update(_filter_part(task, out, part, a["filter"]))
    write_part(out, task.folder, task.shard, part)
    if "written" in result:
        write_cand(out, task.folder, task.shard, part)
    return result


def _clip_scores(task: ShardTask, part: dict) -> None:
    alive = np.flatnonzero(np.asarray(part["status"], dtype=object) == "written")
    if not len(alive):
        return
    r = part["row"][alive]
    blocks = []
    for m in ("image", "text"):
        x = np.asarray(open_rows(task.build, f"embeddings/{m}/{task.shard}.npy")[np.sort(r)], dtype=np.float32)
        inv = np.empty(len(r), dtype=np.int64)
        inv[np.argsort(r, kind="stable")] = np.arange(len(r))
        blocks.append(x[inv])
    img, txt = blocks
    both = np.any(img != 0, axis=1) & np.any(txt != 0, axis=1)
    for p, s in zip(alive[both].tolist(), np.einsum("ij,ij->i", img[both], txt[both]).tolist()):
        part["clip_score"][p] = float(np.float32(s))  # as the float32 column stores it


def _threshold(part: dict, column: str, name: str, low, high) -> None:
    """filter:<name> for alive samples whose value lies outside [low, high] (no value: not filtered)."""
    values = part[column]
    for p, v in enumerate(values):
        if part["status"][p] != "written" or v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        if (low is not None and v < low) or (high is not None and v > high):
            part["status"][p], part["reason"][p] = "filtered", f"filter:{name}"


def _scored_keys(part: dict) -> tuple[np.ndarray, np.ndarray]:
    """(rows, ordered keys) of the alive samples that have a CLIP score."""
    rows = np.asarray([p for p, (s, v) in enumerate(zip(part["status"], part["clip_score"]))
                       if s == "written" and v is not None], dtype=np.int64)
    return rows, ordered(np.asarray([part["clip_score"][p] for p in rows.tolist()], dtype=np.float32))


def _save_hist(out: OutputDir, rel: str, values: np.ndarray) -> None:
    v, c = np.unique(np.asarray(values, dtype=np.int64), return_counts=True)
    save_npy(out, rel, np.stack([v, c.astype(np.int64)]) if len(v) else np.zeros((2, 0), np.int64))


def _clip_pass(task: ShardTask, out: OutputDir) -> dict:
    """The top-fraction cut's later passes over one shard: ``h2`` (low bits of the keys in the cut's
    high bin), ``h3`` (rank bins of the keys equal to the cut), ``ranks`` (the ranks in one such bin)."""
    a = task.args
    part = read_part(out, task.folder, task.shard)
    rows, keys = _scored_keys(part)
    keys = keys.astype(np.int64)
    if a["pass"] == "h2":
        mine = keys[keys >> HIST_BITS == a["high"]]
        _save_hist(out, f"{task.folder}/clip/h2/{task.shard}.npy", mine & ((1 << HIST_BITS) - 1))
        return {}
    tied = part["rank"][rows[keys == a["cut"]]]
    if a["pass"] == "h3":
        _save_hist(out, f"{task.folder}/clip/h3/{task.shard}.npy", tied >> a["shift"])
        return {}
    return {"ranks": sorted(tied[tied >> a["shift"] == a["bin"]].tolist())}


def _filter(task: ShardTask, out: OutputDir) -> dict:
    """The top-fraction cut and the per-sample filters; then the candidates."""
    part = read_part(out, task.folder, task.shard)
    result = _filter_part(task, out, part, task.args)
    write_part(out, task.folder, task.shard, part)
    write_cand(out, task.folder, task.shard, part)
    return result


def _filter_part(task: ShardTask, out: OutputDir, part: dict, args: dict) -> dict:
    """Apply the top-fraction cut (``args.cut``) and the filters of ``args.cfg`` to ``part``; the
    alive samples and, with decontamination to come, how many it will search."""
    from mmdata.curate.config import CurateConfig

    cfg = CurateConfig(**args["cfg"])
    cut = args.get("cut")
    if cut is not None:
        rows, keys = _scored_keys(part)
        keys = keys.astype(np.int64)
        drop = (keys < cut["key"]) | ((keys == cut["key"]) & (part["rank"][rows] > cut["rank"]))
        for p in rows[drop].tolist():
            part["status"][p], part["reason"][p] = "filtered", "filter:clip_top_fraction"
    if cfg.languages is not None:
        keep = set(cfg.languages)
        for p, (lang, score) in enumerate(zip(part["language"], part["language_score"])):
            if part["status"][p] == "written" and lang is not None and (lang not in keep or score < cfg.language_min_score):
                part["status"][p], part["reason"][p] = "filtered", "filter:language"
    _threshold(part, "words", "words", cfg.min_words, cfg.max_words)
    _threshold(part, "tokens", "tokens", cfg.min_tokens, cfg.max_tokens)
    _threshold(part, "loudness", "loudness", cfg.min_loudness, cfg.max_loudness)
    _threshold(part, "clipping", "clipping", None, cfg.max_clipping)
    _threshold(part, "speech_ratio", "speech_ratio", cfg.min_speech_ratio, cfg.max_speech_ratio)
    alive = np.flatnonzero(np.asarray(part["status"], dtype=object) == "written")
    result = {"written": len(alive)}
    if args.get("decontaminate"):  # the samples decontamination will search: its base for the next step
        result["searched"] = int(present_rows(task.build, task.shard, args["decontaminate"]["modality"],
                                              part["row"][alive]).sum()) if len(alive) else 0
    return result


def _decontaminate_step(task: ShardTask, out: OutputDir) -> dict:
    part = read_part(out, task.folder, task.shard)
    _decontaminate(task, part, **task.args["decontaminate"])
    write_part(out, task.folder, task.shard, part)
    return {"written": write_cand(out, task.folder, task.shard, part)}


_EVAL: dict = {}


def _eval_index(url: str, modality: str):
    """A flat inner-product index of the written ``modality`` vectors of the build at ``url`` (an
    evaluation set), and their keys; kept per process."""
    import faiss

    if (url, modality) not in _EVAL:
        from mmdata.curate.inputs import InputBuild

        ev = InputBuild(url)
        index, keys = None, []
        for shard in ev.shards:
            t = pq.read_table(io.BytesIO(ev.out.read_bytes(f"shards/{shard}.parquet")), columns=["key", "status", "row"],
                              use_threads=False).to_pydict()
            mine = [(k, r) for k, s, r in zip(t["key"], t["status"], t["row"]) if s == "written"]
            if not mine:
                continue
            x = vectors_of(url, shard, modality, np.asarray([r for _, r in mine], dtype=np.int64))
            present = np.any(x != 0, axis=1)
            if index is None:
                index = faiss.IndexFlatIP(x.shape[1])
            index.add(np.ascontiguousarray(x[present]))
            keys += [k for (k, _), ok in zip(mine, present.tolist()) if ok]
        _EVAL.clear()
        _EVAL[(url, modality)] = (index, keys)
    return _EVAL[(url, modality)]


def vectors_of(url: str, shard: str, modality: str, rows: np.ndarray) -> np.ndarray:
    """float32 rows of the shard's ``modality`` embeddings (``pair``: image and text, scaled by 1/sqrt(2))."""
    from mmdata.curate.vectors import VectorSet

    mods = ["image", "text"] if modality == "pair" else [modality]
    vs = VectorSet([{"url": url, "rels": [f"embeddings/{m}/{shard}.npy" for m in mods]}],
                   np.zeros(len(rows), np.int64), np.asarray(rows, dtype=np.int64))
    return vs.take(np.arange(len(rows)))


def present_rows(url: str, shard: str, modality: str, rows: np.ndarray) -> np.ndarray:
    """Which of ``rows`` have the modality (a sample without it has a zero row; ``pair``: both)."""
    mods = ["image", "text"] if modality == "pair" else [modality]
    ok = np.ones(len(rows), dtype=bool)
    for m in mods:
        ok &= np.any(np.asarray(open_rows(url, f"embeddings/{m}/{shard}.npy")[rows]) != 0, axis=1)
    return ok


def _decontaminate(task: ShardTask, part: dict, url: str, modality: str, min_cosine: float) -> None:
    index, keys = _eval_index(url, modality)
    alive = np.flatnonzero(np.asarray(part["status"], dtype=object) == "written")
    if index is None or not len(keys) or not len(alive):
        return
    from mmdata.curate.semantic import BLAS_ROWS, SEARCH_CHUNK, search

    ok = present_rows(task.build, task.shard, modality, part["row"][alive])
    pos = alive[ok]
    chunk_of = (task.args["base"] + np.arange(len(pos))) // SEARCH_CHUNK  # searched as one search over the build would
    for c in np.unique(chunk_of).tolist():
        chunk = pos[chunk_of == c]
        x = vectors_of(task.build, task.shard, modality, part["row"][chunk])
        sims, nn = search(index, x, blas=min(SEARCH_CHUNK, task.args["n"] - c * SEARCH_CHUNK) >= BLAS_ROWS)
        for p, s, i in zip(chunk.tolist(), sims[:, 0].tolist(), nn[:, 0].tolist()):
            part["decontaminate_cosine"][p] = float(np.float32(s))
            if s >= min_cosine:
                part["status"][p], part["reason"][p] = "filtered", f"decontaminate:{keys[i]}"


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

    tables = [pq.read_table(io.BytesIO(out.read_bytes(f"{task.folder}/pieces/{task.shard}_{r:05d}.parquet")),
                            use_threads=False) for r in task.args["runs"]]
    table = pa.concat_tables(tables) if tables else PLAN_SCHEMA.empty_table()
    buf = io.BytesIO()
    pq.write_table(table.combine_chunks(), buf, compression="zstd")
    out.write_bytes(f"{task.folder}/units/{task.shard}.parquet", buf.getvalue())
    return {"rows": table.num_rows}


STEPS = {"measure": _measure, "phash_source": _phash_source, "decontaminate": _decontaminate_step, "pieces": _pieces, "assemble": _assemble, "scan": _scan, "rank": _rank, "init": _init, "clip": _clip_pass, "filter": _filter, "apply": _apply}
