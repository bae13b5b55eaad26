"""The per-sample decisions of a curation's parts: measure errors, the CLIP score and its
thresholds (``clip_min``; ``clip_top_fraction``'s histogram passes, the driver finding the cut), the
language and length filters and the audio measures' thresholds."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmdata.curate.parts import (
    ShardTask,
    build_table,
    present_rows,
    read_part,
    write_cand,
    write_part,
)
from mmdata.curate.vectors import load_npy, open_rows, save_npy
from mmdata.storage import OutputDir

BUILD_COLUMNS = ["key", "status", "reason", "row", "orig_width", "orig_height", "view_of"]
MEASURES = ("language", "language_score", "words", "tokens", "speech_ratio", "loudness", "clipping")
HIST_BITS = 16


def ordered(scores: np.ndarray) -> np.ndarray:
    """float32 scores as uint32 in the same order (-0.0 as 0.0)."""
    b = (np.asarray(scores, dtype=np.float32) + np.float32(0)).view(np.uint32)
    return np.where(b >> np.uint32(31), ~b, b | np.uint32(1 << 31)).astype(np.uint32)


def _init(task: ShardTask, out: OutputDir) -> dict:
    """The part from the build's table and the measures: errors, CLIP score, ``clip_min``; the
    histogram of the CLIP scores (high bits) when a top fraction is asked for."""
    from mmdata.curate.features import load_features

    a = task.args
    t = build_table(task, BUILD_COLUMNS)
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


STEPS = {"init": _init, "clip": _clip_pass, "filter": _filter}
