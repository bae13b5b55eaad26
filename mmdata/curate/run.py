"""``mmdata curate``: read a build, decide per sample, write the curated build in the same layout."""
from __future__ import annotations

import hashlib
import io
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmdata.version import __version__
from mmdata.config import BuildConfig
from mmdata.curate import decide
from mmdata.curate.config import CurateConfig
from mmdata.curate.features import FEATURES_SCHEMA, FeatureTask, load_features, run_feature_task
from mmdata.curate.exact import n_buckets
from mmdata.curate.inputs import InputBuild
from mmdata.curate.markers import is_done, mark_done, read_mark
from mmdata.curate.semantic import semantic_dedup
from mmdata.curate.write import PLAN_SCHEMA, WriteTask, cut, run_write_task, summary_reason
from mmdata.errors import UserError
from mmdata.layout import clear_output, is_mmdata_output
from mmdata.records import Unit
from mmdata.storage import OutputDir

SCRATCH = ".mmdata-curate"


def _absolute(url: str) -> str:
    return url if "://" in url else os.path.abspath(url)


def _unfinished(out: OutputDir) -> dict | None:
    """The identity of the unfinished curation in ``out`` (its first manifest), or None."""
    try:
        manifest = json.loads(out.read_bytes("manifest.json"))
    except (OSError, ValueError):
        return None
    curate = manifest.get("curate") if isinstance(manifest, dict) else None
    if isinstance(curate, dict) and curate.get("finished") is False:
        return curate.get("run") or {}
    return None


def _prepare_output(out: OutputDir, overwrite: bool, identity: dict) -> bool:
    """Make ``out`` ready; True when it resumes an unfinished curation of the same source and config."""
    files = out.fs.find(out.root) if out.fs.exists(out.root) else []
    if files:
        unfinished = _unfinished(out) if not overwrite else None
        if unfinished == identity:
            out.clean_temporaries()
            return True
        if unfinished is not None:
            raise UserError(f"{out.url} holds an unfinished curation of another build or config; "
                            "re-run that command to resume it, or pass --overwrite to start over")
        if not overwrite:
            raise UserError(f"{out.url} is not empty; choose another --out or pass --overwrite")
        if not is_mmdata_output(out) and not all(SCRATCH in f for f in files):
            raise UserError(f"--overwrite: {out.url} is not empty and is not an mmdata output; refusing to delete its files")
        clear_output(out)
    out.remove(SCRATCH)
    out.ensure_writable()
    # marks the folder as an mmdata output from the start, so a run killed midway can be --overwritten,
    # and names what it curates, so the same command resumes it; the finished manifest replaces it
    out.write_bytes("manifest.json", json.dumps({"mmdata_version": __version__,
                                                 "curate": {"finished": False, "run": identity}}).encode())
    return False


def _engine_config(build: InputBuild, cfg: CurateConfig, out_url: str) -> BuildConfig:
    base = dict(build.manifest.get("config") or {})
    base.update(out=out_url, engine=cfg.engine, workers=cfg.workers, dask_address=cfg.dask_address,
                beam_options=cfg.beam_options, progress=False, overwrite=False)
    if cfg.samples_per_shard:
        base["samples_per_shard"] = cfg.samples_per_shard
    try:
        return BuildConfig(**base)
    except ValueError as exc:
        raise UserError(f"{build.url}: its manifest's config does not load in this version ({exc})") from None


def _features(build: InputBuild, cfg: CurateConfig, out: OutputDir, engine) -> dict:
    """Measure every written sample on the engine; the measures as lists over the build's positions."""
    tasks = [FeatureTask(build.url, out.url, SCRATCH, name, phash=cfg.phash_max_distance is not None,
                         language=True, tokenizer=cfg.tokenizer, audio=True,
                         speech=cfg.min_speech_ratio is not None or cfg.max_speech_ratio is not None,
                         exact=tuple(cfg.exact), buckets=n_buckets(len(build)))
             for name in build.shards if not is_done(out, SCRATCH, "measure", name)]  # resumed: done ones skipped
    if tasks:
        engine.map_tasks(run_feature_task, tasks, name="curate-features")
    n = len(build)
    skip = {"pos", "caption_hash", "audio_member_sha256"}  # the exact-dedup tasks read those from scratch files
    feats = {f.name: [None] * n for f in FEATURES_SCHEMA if f.name not in skip}
    offsets = np.concatenate([[0], np.cumsum(np.bincount(build.shard, minlength=len(build.shards)))])
    for i, name in enumerate(build.shards):
        table = load_features(out, SCRATCH, name).select(["pos", *feats]).to_pydict()
        for j, pos in enumerate(table["pos"]):
            for col in feats:
                feats[col][offsets[i] + pos] = table[col][j]
    return feats


def decide_all(build: InputBuild, cfg: CurateConfig, feats: dict, out: OutputDir, engine, parallelism: int) -> decide.Decisions:
    dec = decide.Decisions(build)
    decide.set_measures(dec, feats)
    decide.filters(dec, cfg)
    if cfg.exclude_near:
        decide.decontaminate(dec, cfg, InputBuild(_absolute(cfg.exclude_near)))
    decide.exact(dec, cfg, out=out, folder=f"{SCRATCH}/exact", buckets=n_buckets(len(build)), engine=engine)
    if cfg.phash_max_distance is not None:
        decide.perceptual(dec, feats, cfg.phash_max_distance, out=out, folder=f"{SCRATCH}/phash", engine=engine)
    for modality in cfg.semantic:
        vectors, positions = build.vectors(modality, dec.dedup_candidates())
        dup, kept, cos = semantic_dedup(vectors, cfg.eps(modality), out=out, folder=f"{SCRATCH}/semantic_{modality}",
                                        engine=engine, n_clusters=cfg.semantic_clusters, keep=cfg.semantic_keep,
                                        train_size=cfg.semantic_train_size, seed=cfg.seed, parallelism=parallelism)
        dec.duplicates(f"semantic_{modality}", positions[dup], positions[kept], cos)
    dec.resolve()
    return dec


def _write_plans(build: InputBuild, dec: decide.Decisions, out: OutputDir, per_shard: int) -> list[str]:
    order = np.argsort(build.rank, kind="stable")  # positions in key order
    shards = cut(order.tolist(), (dec.status[order] == "written").tolist(), per_shard)
    del order
    names = []
    for i, positions in enumerate(shards):  # columns, not a dict per row: a shard's plan spans its removed rows too
        name = f"{i:05d}"
        positions = np.asarray(positions, dtype=np.int64)
        columns = {"in_shard": pa.array(np.asarray(build.shards, dtype=object)[build.shard[positions]], pa.string()),
                   "in_pos": pa.array(build.pos[positions], pa.int32()),
                   "status": pa.array(dec.status[positions], pa.string()),
                   "reason": pa.array([dec.reason[p] for p in positions.tolist()], pa.string()),
                   **{c: pa.array([dec.scores[c][p] for p in positions.tolist()], PLAN_SCHEMA.field(c).type)
                      for c in decide.SCORE_COLUMNS}}
        buf = io.BytesIO()
        pq.write_table(pa.table(columns, schema=PLAN_SCHEMA), buf, compression="zstd")
        out.write_bytes(f"{SCRATCH}/units/{name}.parquet", buf.getvalue())
        names.append(name)
    return names


def curate(build_url: str, out_url: str, cfg: CurateConfig) -> dict:
    """Curate the build at ``build_url`` into ``out_url``; return the curated manifest."""
    from mmdata.engines.base import get_engine
    from mmdata.pipeline.finalize import merge_stats, package_versions

    started = time.perf_counter()
    build_url, out_url = _absolute(build_url), _absolute(out_url)
    if build_url.rstrip("/") == out_url.rstrip("/"):
        raise UserError("--out must differ from the build being curated")
    build = InputBuild(build_url)
    out = OutputDir(out_url)
    config = _engine_config(build, cfg, out_url)
    curate_hash = hashlib.sha256(json.dumps(cfg.content_dict(), sort_keys=True).encode()).hexdigest()[:16]
    identity = {"source": build.url, "config_hash": curate_hash, "source_config_hash": build.manifest.get("config_hash"),
                "source_counts": build.manifest.get("counts"), "samples_per_shard": config.samples_per_shard}
    resumed = _prepare_output(out, cfg.overwrite, identity)
    engine = get_engine(config)
    try:
        if not is_done(out, SCRATCH, "decide", "all"):
            feats = _features(build, cfg, out, engine)
            dec = decide_all(build, cfg, feats, out, engine, engine.parallelism)
            names = _write_plans(build, dec, out, config.samples_per_shard)
            mark_done(out, SCRATCH, "decide", "all", {"names": names, "removed": _removed_counts(dec)})
            del feats, dec
        decided = read_mark(out, SCRATCH, "decide", "all")
        names, removed = decided["names"], decided["removed"]
        tasks = [WriteTask(build.url, out.url, SCRATCH, name, build.modalities, curate_hash,
                           cfg.tokenizer if cfg.tokens_member else None) for name in names]
        todo = [t for t in tasks if not is_done(out, SCRATCH, "write", t.name)]  # resumed: done shards skipped
        if todo:
            engine.map_tasks(run_write_task, todo, name="curate-write")
        all_stats = [read_mark(out, SCRATCH, "write", name) for name in names]
        sizes = {s["shard"]: s["counts"]["written"] for s in all_stats}
        out.write_bytes("shards/sizes.json", json.dumps(sizes, indent=1, sort_keys=True).encode())
        merged = merge_stats(all_stats)
        c = merged["counts"]
        if c["inputs"] != len(build) or c["inputs"] != c["written"] + c["filtered"] + c["failed"]:
            raise UserError(f"curated counts do not reconcile with the build's {len(build)} rows: {c}")
        manifest = {"mmdata_version": __version__, "config": config.model_dump(mode="json"),
                    "config_hash": config.config_hash, "versions": package_versions(), **merged,
                    "units": len(names), "shards": [s["shard"] for s in all_stats],
                    "curate": {"source": build.url, "config": cfg.content_dict(), "config_hash": curate_hash,
                               "input_counts": build.manifest.get("counts"),
                               "removed": removed, **({"resumed": True} if resumed else {})}}
        if build.manifest.get("audio"):
            manifest["audio"] = build.manifest["audio"]
        if build.modalities:
            manifest["embeddings"] = build.manifest["embeddings"]
            if config.index:
                from mmdata.index.step import build_indexes

                infos = build_indexes(config, out, [Unit(int(n), []) for n in names], engine)
                manifest["index"] = {m: {k: i.get(k) for k in ("index_key", "n", "recall_at_10")} for m, i in infos.items()}
    finally:
        engine.close()
    manifest["timings"] = {"wall_seconds": round(time.perf_counter() - started, 3)}
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out.write_bytes("manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())  # the commit point
    out.remove(SCRATCH)
    if config.report:  # the curated build's report: its funnel lists every curation reason, its plots the scores
        from mmdata.pipeline.finalize import write_report_or_warn

        write_report_or_warn(out, manifest)
    out.clean_temporaries()
    return manifest


def _removed_counts(dec: decide.Decisions) -> dict:
    """Samples written in the build and removed by curation, by summary reason."""
    counts: dict[str, int] = {}
    for p in np.flatnonzero(dec.build.written & (dec.status != "written")):
        r = summary_reason(dec.reason[p])
        counts[r] = counts.get(r, 0) + 1
    return dict(sorted(counts.items()))
