"""``mmdata curate``: read a build, decide per sample, write the curated build in the same layout."""
from __future__ import annotations

import hashlib
import json
import os
import time

from mmdata.config import BuildConfig
from mmdata.curate import stages
from mmdata.curate.config import CurateConfig
from mmdata.curate.features import FeatureTask
from mmdata.curate.inputs import InputBuild
from mmdata.curate.markers import is_done, mark_done, read_mark
from mmdata.curate.write import WriteTask, run_write_task
from mmdata.errors import UserError
from mmdata.layout import clear_output, is_mmdata_output
from mmdata.records import Unit
from mmdata.storage import OutputDir
from mmdata.version import __version__

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


def partition(build: InputBuild) -> dict:
    """The sizing constants that decide which task files (and done markers) a curation has: a resumed
    run trusts the markers of the killed one only when these are the same (an mmdata upgrade may
    change them)."""
    from mmdata.curate import exact, phash, semantic

    inputs = int((build.manifest.get("counts") or {}).get("inputs") or 0)
    return {"exact_buckets": exact.n_buckets(inputs), "exact_bucket_rows": exact.bucket_rows(),
            "phash_task_rows": phash.TASK_ROWS, "semantic_task_bytes": semantic.TASK_BYTES,
            "semantic_search_chunk": semantic.SEARCH_CHUNK}


def _prepare_output(out: OutputDir, overwrite: bool, identity: dict) -> bool:
    """Make ``out`` ready; True when it resumes an unfinished curation of the same source and config."""
    files = out.fs.find(out.root) if out.fs.exists(out.root) else []
    if files:
        unfinished = _unfinished(out) if not overwrite else None
        if unfinished == identity:
            out.clean_temporaries()
            return True
        if unfinished is not None:
            differ = sorted(k for k in set(identity) | set(unfinished) if identity.get(k) != unfinished.get(k))
            raise UserError(f"{out.url} holds an unfinished curation of another build, config or mmdata version "
                            f"({', '.join(differ)} differ); re-run that command with the mmdata that started it to "
                            "resume it, or pass --overwrite to start over")
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


def _features(build: InputBuild, cfg: CurateConfig, out: OutputDir, buckets: int):
    """The measure task of an input shard (``<scratch>/features/<shard>.parquet``)."""
    return lambda name: FeatureTask(build.url, out.url, SCRATCH, name, phash=cfg.phash_max_distance is not None,
                                    language=True, tokenizer=cfg.tokenizer, audio=True,
                                    speech=cfg.min_speech_ratio is not None or cfg.max_speech_ratio is not None,
                                    exact=tuple(cfg.exact), buckets=buckets)


def curate(build_url: str, out_url: str, cfg: CurateConfig) -> dict:
    """Curate the build at ``build_url`` into ``out_url``; return the curated manifest."""
    from mmdata.engines.base import get_engine
    from mmdata.pipeline.finalize import merge_stats, package_versions

    started = time.perf_counter()
    build_url, out_url = _absolute(build_url), _absolute(out_url)
    if build_url.rstrip("/") == out_url.rstrip("/"):
        raise UserError("--out must differ from the build being curated")
    build = InputBuild(build_url)
    stages.check(build, cfg)
    out = OutputDir(out_url)
    config = _engine_config(build, cfg, out_url)
    curate_hash = hashlib.sha256(json.dumps(cfg.content_dict(), sort_keys=True).encode()).hexdigest()[:16]
    identity = {"source": build.url, "config_hash": curate_hash, "source_config_hash": build.manifest.get("config_hash"),
                "source_counts": build.manifest.get("counts"), "samples_per_shard": config.samples_per_shard,
                "mmdata_version": __version__, "partition": partition(build)}
    resumed = _prepare_output(out, cfg.overwrite, identity)
    engine = get_engine(config)
    if hasattr(engine, "keep_pool"):  # the local engine: one pool for the many short rounds of tasks
        engine.keep_pool()
    try:
        if not is_done(out, SCRATCH, "decide", "all"):
            driver = stages.Driver(build, out, SCRATCH, engine)
            driver.scan(_features(build, cfg, out, driver.buckets))
            stages.decide_all(driver, cfg, engine.parallelism)
            names, removed = stages.write_plans(driver, config.samples_per_shard)
            mark_done(out, SCRATCH, "decide", "all", {"names": names, "removed": removed, "rows": driver.rows})
            del driver
        decided = read_mark(out, SCRATCH, "decide", "all")
        names, removed, rows = decided["names"], decided["removed"], decided["rows"]
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
        if c["inputs"] != rows or c["inputs"] != c["written"] + c["filtered"] + c["failed"]:
            raise UserError(f"curated counts do not reconcile with the build's {rows} rows: {c}")
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
