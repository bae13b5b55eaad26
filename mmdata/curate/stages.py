"""The decision rounds of a curation, driven with per-shard bookkeeping only (see ``mmdata.curate.decide``
for the order of the decisions, ``mmdata.curate.parts`` for the state on disk)."""
from __future__ import annotations

import hashlib
import math

import numpy as np

from mmdata.curate.config import CurateConfig
from mmdata.curate.filters import HIST_BITS
from mmdata.curate.keyrank import needs_merge, rank_groups
from mmdata.curate.parts import ShardTask
from mmdata.curate.steps import run_shard_task
from mmdata.curate.vectors import load_npy, save_npy
from mmdata.errors import UserError


class Driver:
    """The per-shard bookkeeping of one curation: names, offsets, kept counts; runs the steps."""

    def __init__(self, build, out, folder: str, engine):
        self.build, self.out, self.folder, self.engine = build, out, folder, engine
        self.shards = build.shards
        self.offsets = np.zeros(len(self.shards) + 1, dtype=np.int64)
        self.written = [0] * len(self.shards)
        self.scans: list[dict] = []
        self.groups: list[list[int]] = []
        from mmdata.curate.exact import n_buckets

        # exact dedup's hash buckets, from the build's count (the measure tasks write their digests by bucket)
        self.buckets = n_buckets(int((build.manifest.get("counts") or {}).get("inputs") or 0))

    @property
    def rows(self) -> int:
        return int(self.offsets[-1])

    def tasks(self, step: str, args: dict | None = None, per_shard: list[dict] | None = None,
              only: list[int] | None = None) -> list[dict]:
        idx = list(range(len(self.shards))) if only is None else only
        items = [ShardTask(self.build.url, self.out.url, self.folder, self.shards[i], i, int(self.offsets[i]), step,
                           {**(args or {}), **(per_shard[i] if per_shard else {})}) for i in idx]
        return self.engine.map_tasks(run_shard_task, items, name=f"curate-{step}") if items else []

    def scan(self, features) -> None:
        """Scan the shards' keys and measure their samples (``features(shard)``: the FeatureTask)."""
        import json

        self.out.write_bytes(f"{self.folder}/shards.json", json.dumps(self.shards).encode())
        self.scans = self.tasks("measure", per_shard=[{"features": features(s)} for s in self.shards])
        self.offsets[1:] = np.cumsum([s["rows"] for s in self.scans])
        save_npy(self.out, f"{self.folder}/offsets.npy", self.offsets)
        self.groups = rank_groups(self.scans)
        merge = [g for g in self.groups if needs_merge(g, self.scans)]
        items = [ShardTask(self.build.url, self.out.url, self.folder, self.shards[g[0]], g[0], int(self.offsets[g[0]]),
                           "rank", {"shards": [self.shards[i] for i in g], "base": int(self.offsets[g[0]])}) for g in merge]
        if items:
            self.engine.map_tasks(run_shard_task, items, name="curate-rank")
        self.ranked = {i for g in merge for i in g}

    def count(self, results: list[dict]) -> None:
        for i, r in enumerate(results):
            self.written[i] = r["written"]


def check(build, cfg: CurateConfig) -> None:
    """Refuse, before any work, a semantic dedup on embeddings the build does not have."""
    for modality in cfg.semantic:
        if any(m not in build.modalities for m in (["image", "text"] if modality == "pair" else [modality])):
            raise UserError(f"{build.url} has no {'image/text' if modality == 'pair' else modality} embeddings "
                            f"(it has: {', '.join(build.modalities) or 'none'})")


def decide_all(d: Driver, cfg: CurateConfig, parallelism: int) -> None:
    build = d.build
    clip = "image" in build.modalities and "text" in build.modalities
    top = clip and cfg.clip_top_fraction is not None
    decont = _decontamination(build, cfg) if cfg.exclude_near else None
    filters = {"cfg": cfg.content_dict(), "cut": None, "decontaminate": decont}
    results = d.tasks("init", {"clip": clip, "clip_min": cfg.clip_min, "top": top, "filter": None if top else filters},
                      per_shard=[{"ranked": i in d.ranked} for i in range(len(d.shards))])
    if top:  # the filters wait for the global cut
        cut = _top_cut(d, cfg.clip_top_fraction, sum(r["scored"] for r in results))
        results = d.tasks("filter", {**filters, "cut": cut})
    if decont:
        n = [r["searched"] for r in results]
        base = np.concatenate([[0], np.cumsum(n)]).tolist()
        results = d.tasks("decontaminate", {"decontaminate": decont, "n": int(sum(n))},
                          per_shard=[{"base": int(b)} for b in base[:-1]])
        from mmdata.curate.decontaminate import _EVAL

        _EVAL.clear()  # the evaluation index, held here when the tasks ran in this process
    d.count(results)
    exact(d, cfg)
    if cfg.phash_max_distance is not None:
        perceptual(d, cfg.phash_max_distance)
    for modality in cfg.semantic:
        semantic(d, cfg, modality, parallelism)


def _hist(out, rels: list[str], bins: int) -> np.ndarray:
    total = np.zeros(bins, dtype=np.int64)
    for rel in rels:
        v, c = load_npy(out, rel)
        np.add.at(total, v, c)
    return total


def _top_cut(d: Driver, fraction: float, scored: int) -> dict | None:
    """The cut of ``clip_top_fraction`` with the rule of one global sort (higher score first, then key
    order), found from histograms: the high bits of the kept-last score, its low bits, then among the
    samples with exactly that score the rank of the last one kept. None: all kept."""
    keep = math.ceil(fraction * scored)
    if keep >= scored:
        return None
    bins = 1 << HIST_BITS
    h1 = _hist(d.out, [f"{d.folder}/clip/h1/{s}.npy" for s in d.shards if d.out.exists(f"{d.folder}/clip/h1/{s}.npy")], bins)
    above = np.cumsum(h1[::-1])[::-1]  # samples with a high part >= b
    high = int(np.flatnonzero(above >= keep)[-1])
    before = int(above[high] - h1[high])  # samples above the high bin
    d.tasks("clip", {"pass": "h2", "high": high})
    h2 = _hist(d.out, [f"{d.folder}/clip/h2/{s}.npy" for s in d.shards], bins)
    above2 = before + np.cumsum(h2[::-1])[::-1]
    low = int(np.flatnonzero(above2 >= keep)[-1])
    key = (high << HIST_BITS) | low
    greater = int(above2[low] - h2[low])
    ties = keep - greater  # samples of score ``key`` kept, in key order
    if ties >= h2[low]:
        return {"key": key, "rank": np.iinfo(np.int64).max}
    shift = max(0, d.rows.bit_length() - HIST_BITS)
    d.tasks("clip", {"pass": "h3", "cut": key, "shift": shift})
    h3 = _hist(d.out, [f"{d.folder}/clip/h3/{s}.npy" for s in d.shards], (d.rows >> shift) + 1)
    upto = np.cumsum(h3)
    b = int(np.flatnonzero(upto >= ties)[0])
    ranks = sorted(r for res in d.tasks("clip", {"pass": "ranks", "cut": key, "shift": shift, "bin": b}) for r in res["ranks"])
    return {"key": key, "rank": int(ranks[ties - int(upto[b] - h3[b]) - 1])}


def _decontamination(build, cfg: CurateConfig) -> dict:
    from mmdata.curate.inputs import InputBuild

    eval_build = InputBuild(cfg.exclude_near if "://" in cfg.exclude_near else __import__("os").path.abspath(cfg.exclude_near))
    common = [m for m in ("image", "text", "audio", "fused") if m in build.modalities and m in eval_build.modalities]
    modality = cfg.exclude_modality or (common[0] if common else None)
    if modality is None or modality not in common:
        raise UserError(f"--exclude-near: the two builds share no {modality or ''} embeddings "
                        f"({', '.join(build.modalities) or 'none'} vs {', '.join(eval_build.modalities) or 'none'})")
    ours, theirs = build.dim(modality), eval_build.dim(modality)
    if ours is not None and theirs is not None and ours != theirs:
        raise UserError(f"--exclude-near: {modality} embeddings differ in dimension ({ours} vs {theirs}): "
                        "the two builds used different models")
    return {"url": eval_build.url, "modality": modality, "min_cosine": cfg.exclude_min_cosine}


def _apply(d: Driver, method: str, files: list[str]) -> None:
    d.count(d.tasks("apply", {"method": method, "files": files}))


def exact(d: Driver, cfg: CurateConfig) -> None:
    """Identical source bytes (image_sha256, audio_sha256) or normalised caption: the first key stays.
    Grouped by hash bucket in engine tasks (``mmdata.curate.exact``) from the digests the measure
    tasks wrote; one round per modality, over the samples still kept."""
    from mmdata.curate.exact import exact_tasks

    folder = f"{d.folder}/exact"
    save_npy(d.out, f"{folder}/offsets.npy", d.offsets)
    from mmdata.curate.markers import read_mark

    for modality in ("image", "text", "audio"):
        if modality in cfg.exact and sum(s["digests"].get(modality, 0) for s in d.scans):
            files = exact_tasks(d.out, folder, modality, d.shards, d.buckets, f"{d.folder}/cand", d.engine)
            if sum(read_mark(d.out, folder, f"exact_{modality}", f"{b:05d}")["duplicates"] for b in range(d.buckets)):
                _apply(d, f"exact_{modality}", files)


def perceptual(d: Driver, max_distance: int) -> None:
    """Images within Hamming distance ≤ ``max_distance`` of a better-ranked image (more source pixels,
    then key order) are duplicates of the nearest such image (ties: the better-ranked). Searched by
    multi-index hashing in engine tasks (``mmdata.curate.phash``), not all pairs."""
    from mmdata.curate.phash import buckets, rounds

    if d.rows >= 2**32:
        raise UserError("perceptual dedup ranks at most 2**32 rows; curate the build in parts or turn it off")
    folder = f"{d.folder}/phash"
    n = sum(r["n"] for r in d.tasks("phash_source", {"folder": folder, "buckets": buckets(d.rows)}))
    if n >= 2:
        files, stats = rounds(d.out, folder, d.shards, d.rows, max_distance, d.engine)
        if stats["duplicates"]:
            d.count(d.tasks("apply", {"method": "phash", "files": files, "distance": True}))
    d.out.remove(folder)


def semantic(d: Driver, cfg: CurateConfig, modality: str, parallelism: int) -> None:
    """SemDeDup (``mmdata.curate.semantic``) over the candidates that have the modality."""
    from mmdata.curate.markers import is_done, read_mark
    from mmdata.curate.semantic import (
        TASK_BYTES,
        VectorSet,
        default_clusters,
        group_clusters,
        train_centroids,
    )
    from mmdata.curate.semantic_tasks import (
        PartsClusterTask,
        SemShardTask,
        done_mark,
        run_parts_cluster_task,
        run_sem_shard_task,
    )

    folder = f"{d.folder}/semantic_{modality}"

    def shard_tasks(step: str, **kw) -> list:
        items = [SemShardTask(d.build.url, d.out.url, folder, d.folder, s, int(d.offsets[i]), modality, step,
                              **{k: v[i] if isinstance(v, list) else v for k, v in kw.items()})
                 for i, s in enumerate(d.shards)]
        return d.engine.map_tasks(run_sem_shard_task, items, name=f"semantic-{step}")

    counts = [r["n"] for r in shard_tasks("cands")]
    n = int(sum(counts))
    if n < 2:
        return
    base = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rng = np.random.default_rng(cfg.seed)
    sample = np.sort(rng.choice(n, size=cfg.semantic_train_size, replace=False)) if n > cfg.semantic_train_size else np.arange(n)
    mods = ["image", "text"] if modality == "pair" else [modality]
    parts = [{"url": d.build.url, "rels": [f"embeddings/{m}/{s}.npy" for m in mods]} for s in d.shards]
    where = np.searchsorted(base, sample, side="right") - 1
    part, rows = [], []
    for i in np.unique(where).tolist():
        local = sample[where == i] - base[i]
        rows.append(load_npy(d.out, f"{folder}/cands/{d.shards[i]}.npy")[1][local])
        part.append(np.full(len(local), i, np.int64))
    vectors = VectorSet(parts, np.concatenate(part), np.concatenate(rows))
    centres = train_centroids(vectors, cfg.semantic_clusters or default_clusters(n), cfg.semantic_train_size, cfg.seed)
    del vectors, part, rows, sample, where
    save_npy(d.out, f"{folder}/centres.npy", centres)
    shard_tasks("assign", base=base[:-1].tolist(), n=n)
    sizes = np.zeros(len(centres), dtype=np.int64)
    for s in d.shards:
        sizes += load_npy(d.out, f"{folder}/sizes/{s}.npy")
    n_tasks = max(4 * max(1, parallelism), math.ceil(n * centres.shape[1] * 4 / TASK_BYTES))
    digest = hashlib.sha256(np.ascontiguousarray(centres).tobytes()).hexdigest()[:16]
    tasks = [PartsClusterTask(d.build.url, d.out.url, folder, t, g, 1.0 - cfg.eps(modality), cfg.semantic_keep, d.folder,
                              modality, digest) for t, g in enumerate(group_clusters(sizes, n_tasks))]
    # a resumed run skips a done task only when its marker is of the same clusters (another --workers
    # groups them otherwise) and centres
    todo = [t for t in tasks if not is_done(d.out, folder, "cluster", f"{t.task:05d}")
            or {k: read_mark(d.out, folder, "cluster", f"{t.task:05d}").get(k) for k in ("clusters", "centres")} != done_mark(t)]
    if todo:
        d.engine.map_tasks(run_parts_cluster_task, todo, name="semdedup")
    if sum(read_mark(d.out, folder, "cluster", f"{t.task:05d}")["duplicates"] for t in tasks):
        _apply(d, f"semantic_{modality}", [f"{folder}/result_{t.task:05d}.npy" for t in tasks])


def write_plans(d: Driver, per_shard: int) -> tuple[list[str], dict]:
    """The curated shards' plans (``units/<name>.parquet``) in key order: a task per run of shards cuts
    its rows by their kept counts, a task per curated shard joins its pieces."""
    kept_before = 0
    per_run = []
    for g in d.groups:
        per_run.append({"shards": [d.shards[i] for i in g], "kept_before": kept_before, "per_shard": per_shard})
        kept_before += sum(d.written[i] for i in g)
    items = [ShardTask(d.build.url, d.out.url, d.folder, d.shards[g[0]], r, 0, "pieces", per_run[r])
             for r, g in enumerate(d.groups)]
    results = d.engine.map_tasks(run_shard_task, items, name="curate-pieces") if items else []
    n_out = max(1, math.ceil(kept_before / per_shard))
    runs: list[list[int]] = [[] for _ in range(n_out)]
    removed: dict[str, int] = {}
    for r, res in enumerate(results):
        for t in res["outs"]:
            runs[t].append(r)
        for k, v in res["removed"].items():
            removed[k] = removed.get(k, 0) + v
    names = [f"{t:05d}" for t in range(n_out)]
    items = [ShardTask(d.build.url, d.out.url, d.folder, names[t], t, 0, "assemble", {"runs": runs[t]}) for t in range(n_out)]
    d.engine.map_tasks(run_shard_task, items, name="curate-plans")
    return names, dict(sorted(removed.items()))
