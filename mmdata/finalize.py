"""finalize: merge the units' stats into ``shards/sizes.json`` and ``manifest.json``.

Runs once, after every unit has committed, on whichever machine drives the build.
"""
from __future__ import annotations

import json
import platform
import time
from collections import Counter
from importlib import metadata

from mmdata import __version__
from mmdata.config import BuildConfig
from mmdata.errors import UserError
from mmdata.records import Unit
from mmdata.storage import OutputDir
from mmdata.unit import read_committed

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
    counts: Counter = Counter()
    reasons: dict[str, Counter] = {"filtered": Counter(), "failed": Counter()}
    seconds: Counter = Counter()
    for stats in all_stats:
        counts.update(stats["counts"])
        for status, by_reason in stats["reasons"].items():
            reasons[status].update(by_reason)
        seconds.update(stats.get("seconds", {}))
    return {
        "counts": {k: counts[k] for k in ("inputs", "written", "filtered", "failed")},
        "reasons": {k: dict(sorted(v.items())) for k, v in reasons.items()},
        "stage_seconds": {k: round(v, 3) for k, v in sorted(seconds.items())},
    }


def embeddings_facts(config: BuildConfig, all_stats: list[dict]) -> dict:
    """The model behind the embeddings; every unit must have used the same one."""
    facts = [s["encoder"] for s in all_stats if "encoder" in s]
    if any(f != facts[0] for f in facts):
        raise UserError("units were embedded with different models; rebuild with --overwrite")
    dim = facts[0]["embed_dim"] if facts else None
    return {"encoder": facts[0] if facts else None, "modalities": config.embedded_modalities,
            "dtype": config.embedding_dtype, "dim": dim, "l2_normalised": True}


def finalize(config: BuildConfig, out: OutputDir, units: list[Unit], wall_seconds: float) -> dict:
    """Check every unit committed, write sizes.json and manifest.json; return the manifest."""
    all_stats = []
    for unit in units:
        stats = read_committed(out, unit.name, config.config_hash, config.embedded_modalities)
        if stats is None:
            raise UserError(f"unit {unit.name} is not committed; run the build again to finish it")
        if stats["counts"]["inputs"] != len(unit.records):
            raise UserError(f"unit {unit.name} accounts for {stats['counts']['inputs']} of {len(unit.records)} records")
        all_stats.append(stats)
    sizes = {s["shard"]: s["counts"]["written"] for s in all_stats}
    out.write_bytes("shards/sizes.json", json.dumps(sizes, indent=1, sort_keys=True).encode())
    merged = merge_stats(all_stats)
    c = merged["counts"]
    assert c["inputs"] == c["written"] + c["filtered"] + c["failed"], c
    manifest = {
        "mmdata_version": __version__,
        "config": config.model_dump(mode="json"),
        "config_hash": config.config_hash,
        "versions": package_versions(),
        **merged,
        "units": len(units),
        "shards": [s["shard"] for s in all_stats],
        "timings": {"wall_seconds": round(wall_seconds, 3), "samples_per_second": round(c["inputs"] / max(wall_seconds, 1e-9), 2)},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if config.embedded_modalities:
        manifest["embeddings"] = embeddings_facts(config, all_stats)
        if config.index:
            started = time.perf_counter()
            from mmdata.indexing import build_indexes

            infos = build_indexes(config, out, units)
            manifest["index"] = {m: {k: i.get(k) for k in ("index_key", "n", "recall_at_10")} for m, i in infos.items()}
            manifest["timings"]["index_seconds"] = round(time.perf_counter() - started, 3)
    out.write_bytes("manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
    out.clean_temporaries()
    return manifest
