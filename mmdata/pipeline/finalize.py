"""finalize: merge the units' stats into ``shards/sizes.json`` and ``manifest.json``, build the indexes.

Runs once, after every unit has committed, on whichever machine drives the build.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections import Counter
from importlib import metadata

from mmdata.config import BuildConfig
from mmdata.errors import UserError
from mmdata.pipeline.unique_ids import duplicate_ids
from mmdata.pipeline.unit import plan_digest, read_committed
from mmdata.records import Unit
from mmdata.storage import OutputDir
from mmdata.version import __version__

VERSIONED = ("pillow", "numpy", "pyarrow", "webdataset", "open_clip_torch", "torch", "faiss-cpu", "faiss-gpu",
             "ftfy", "fsspec", "soundfile", "soxr", "librosa", "apache-beam", "dask", "distributed")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "mmdata": __version__}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def merge_stats(all_stats: list[dict]) -> dict:
    """Counts are rows (``inputs``: a record split by its transcript is one row per segment);
    ``records`` is how many records of the plan they account for."""
    counts: Counter = Counter()
    reasons: dict[str, Counter] = {"filtered": Counter(), "failed": Counter()}
    seconds: Counter = Counter()
    for stats in all_stats:
        counts.update(stats["counts"])
        for status, by_reason in stats["reasons"].items():
            reasons[status].update(by_reason)
        seconds.update(stats.get("seconds", {}))
    merged = {
        "records": counts["records"],
        "counts": {k: counts[k] for k in ("inputs", "written", "filtered", "failed")},
        "reasons": {k: dict(sorted(v.items())) for k, v in reasons.items()},
        "stage_seconds": {k: round(v, 3) for k, v in sorted(seconds.items())},
    }
    downloads = [s["downloads"] for s in all_stats if s.get("downloads")]
    if downloads:  # the units' download statistics, summed (seconds: over URLs, overlapping)
        total: Counter = Counter()
        outcomes: Counter = Counter()
        for d in downloads:
            total.update({k: v for k, v in d.items() if k != "outcomes"})
            outcomes.update(d.get("outcomes", {}))
        merged["downloads"] = {**{k: total[k] for k in ("urls", "requests", "retries", "bytes")},
                               "seconds": round(total["seconds"], 3), "outcomes": dict(sorted(outcomes.items()))}
    return merged


def _same(all_stats: list[dict], name: str) -> dict | None:
    facts = [s[name] for s in all_stats if name in s]
    for f in facts:
        if f != facts[0]:
            from mmdata.encoders.setup_facts import facts_difference

            diff = facts_difference(facts[0], f, sorted(set(facts[0]) | set(f)))
            raise UserError(f"units were embedded with different models or set-ups ({diff}); "
                            "rebuild with --overwrite, or resume with --reembed-mismatched")
    return facts[0] if facts else None


def embeddings_facts(config: BuildConfig, all_stats: list[dict]) -> dict:
    """The models behind the embeddings (open_clip for image/text/fused, ``audio_encoder`` for
    audio, each with its dimension); every unit must have used the same ones."""
    facts = _same(all_stats, "encoder")
    out = {"encoder": facts, "modalities": config.embedded_modalities, "dtype": config.embedding_dtype,
           "dim": facts["embed_dim"] if facts else None, "l2_normalised": True}
    if config.audio_encoder:
        audio = _same(all_stats, "audio_encoder")
        out.update(audio_encoder=audio, audio_dim=audio["dim"] if audio else None)
    return out


def audio_facts(config: BuildConfig, all_stats: list[dict]) -> dict:
    """How the audio members were made: the AudioConfig, log-mel parameters, totals."""
    cfg = config.audio
    facts = {"config": cfg.model_dump(mode="json"), "flac": {"bits": 16, "sample_rate": cfg.sample_rate or "source"},
             "samples": sum(s.get("audio", {}).get("samples", 0) for s in all_stats),
             "seconds": round(sum(s.get("audio", {}).get("seconds", 0.0) for s in all_stats), 3),
             "segments": {k: getattr(config, k) for k in ("segment_pad", "segment_offset", "min_segment", "max_segment",
                                                          "max_merge_gap")}}
    if cfg.mel:
        from mmdata.transforms.audio import mel_params

        facts["mel"] = mel_params(cfg, cfg.sample_rate or 0)
        if cfg.sample_rate is None:  # the source rate of each clip
            facts["mel"].update(sample_rate="source", fmax=cfg.fmax if cfg.fmax is not None else "sample_rate / 2")
    return facts


def finalize(config: BuildConfig, out: OutputDir, units: list[Unit], wall_seconds: float, engine=None,
             skipped_units: set[str] | frozenset = frozenset()) -> dict:
    """Check every unit committed, write sizes.json, the indexes and manifest.json; return the manifest.

    ``engine``: the build's engine, still open, for a distributed index build (``index_distributed``).
    ``skipped_units``: names of the units a resumed run found committed; ``run`` in the manifest
    counts the work of this run only (the top-level counts cover the whole output).
    """
    all_stats = []
    for unit in units:
        stats = read_committed(out, unit.name, config.config_hash, config.embedded_modalities, plan_digest(unit))
        if stats is None:
            raise UserError(f"unit {unit.name} is not committed; run the build again to finish it")
        if stats["counts"].get("records") != unit.n_records:
            raise UserError(f"unit {unit.name} accounts for {stats['counts'].get('records')} of {unit.n_records} records")
        all_stats.append(stats)
    duplicates = duplicate_ids(out, [unit.name for unit in units], limit=1)
    if duplicates:
        raise UserError(f"{duplicates[0]}; the output is not usable (run mmdata verify {out.url} for all of them)")
    sizes = {s["shard"]: s["counts"]["written"] for s in all_stats}
    out.write_bytes("shards/sizes.json", json.dumps(sizes, indent=1, sort_keys=True).encode())  # fsyncs shards/:
    # the units' commit markers (renamed there without a folder fsync each) are durable before the manifest
    merged = merge_stats(all_stats)
    this_run = merge_stats([s for u, s in zip(units, all_stats) if u.name not in skipped_units])
    c = merged["counts"]
    if c["inputs"] != c["written"] + c["filtered"] + c["failed"]:
        raise UserError(f"the units' counts do not reconcile (inputs {c['inputs']} != written {c['written']} + "
                        f"filtered {c['filtered']} + failed {c['failed']}); run mmdata verify {out.url}")
    manifest = {
        "mmdata_version": __version__,
        "config": config.model_dump(mode="json"),
        "config_hash": config.config_hash,
        "versions": package_versions(),
        **merged,
        "units": len(units),
        "shards": [s["shard"] for s in all_stats],
        "run": {"units_skipped": len(skipped_units), "units_built": len(units) - len(skipped_units),
                "records": this_run["records"], "counts": this_run["counts"]},
        "timings": {"wall_seconds": round(wall_seconds, 3),
                    "samples_per_second": round(this_run["counts"]["inputs"] / max(wall_seconds, 1e-9), 2)},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if any(s.get("audio", {}).get("samples") for s in all_stats):
        manifest["audio"] = audio_facts(config, all_stats)
    if config.embedded_modalities:
        manifest["embeddings"] = embeddings_facts(config, all_stats)
        if config.index:
            started = time.perf_counter()
            from mmdata.index.step import build_indexes

            infos = build_indexes(config, out, units, engine)
            manifest["index"] = {m: {k: i.get(k) for k in ("index_key", "n", "recall_at_10")} for m, i in infos.items()}
            manifest["timings"]["index_seconds"] = round(time.perf_counter() - started, 3)
    out.write_bytes("manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
    if config.report:
        write_report_or_warn(out, manifest)
    out.clean_temporaries()
    return manifest


def write_report_or_warn(out: OutputDir, manifest: dict) -> None:
    """report.html; the build is complete without it, so a failure is a warning that names the remedy
    (``MMDATA_STRICT=1``, set by the test suite, re-raises it)."""
    from mmdata.report import write_report

    try:
        write_report(out, manifest)
    except Exception as exc:  # the shards, tables and index are already committed
        if os.environ.get("MMDATA_STRICT") == "1":
            raise
        print(f"warning: report.html not written ({type(exc).__name__}: {exc}); run mmdata report {out.url}",
              file=sys.stderr)
