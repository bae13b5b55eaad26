"""``mmdata build --retry-failed``: build again only the units whose failures a later run may cure.

A committed unit whose stats count a transient failure (a timeout, a connection error, a DNS
server that did not answer, a 429 or a 5xx, a truncated body) loses its commit marker and is built
again by the ordinary resume; every other unit is skipped, its files untouched byte for byte, and
finalize recounts the whole output.
"""
from __future__ import annotations

import io
import json
import sys

import pyarrow.parquet as pq

from mmdata.config import BuildConfig
from mmdata.errors import UserError
from mmdata.layout import shard_files
from mmdata.pipeline.plan import PLAN_FILE
from mmdata.pipeline.unit import plan_digest, read_committed
from mmdata.records import Unit
from mmdata.sources.http import is_transient
from mmdata.storage import OutputDir


def transient_failures(stats: dict) -> int:
    """How many of a unit's rows failed for a reason a retry may cure."""
    return sum(n for reason, n in stats.get("reasons", {}).get("failed", {}).items() if is_transient(reason))


def uncommit_transient(config: BuildConfig, out: OutputDir, units: list[Unit], resumed: bool) -> list[str]:
    """Remove the commit marker (``_stats.json``) of every committed unit with transient failures, so
    the build runs them again; returns their names. The shard stays readable until it is replaced."""
    if not resumed:
        raise UserError(f"--retry-failed retries an existing build, and {out.url} holds none; "
                        "build it first (without --retry-failed)")
    names, rows = [], 0
    for unit in units:
        stats = read_committed(out, unit.name, config.config_hash, config.embedded_modalities, plan_digest(unit))
        n = transient_failures(stats) if stats is not None else 0
        if n:
            names.append(unit.name)
            rows += n
    for name in names:
        out.remove(shard_files(name)["stats"])
    if config.progress:
        print(f"--retry-failed: {len(names)} of {len(units)} units hold {rows} transient failures; "
              f"building them again", file=sys.stderr)
    return names


def saved_config(out_url: str) -> dict:
    """The configuration an existing build was made with (``manifest.json``, else the plan's
    metadata), so ``mmdata build -o OUT --retry-failed`` needs no other flag."""
    out = OutputDir(out_url)
    if out.exists("manifest.json"):
        try:
            return dict(json.loads(out.read_bytes("manifest.json"))["config"])
        except (ValueError, KeyError, TypeError):
            pass
    if out.exists(PLAN_FILE):
        meta = pq.read_schema(io.BytesIO(out.read_bytes(PLAN_FILE))).metadata or {}
        if b"config" in meta:
            return dict(json.loads(meta[b"config"]))
    raise UserError(f"{out_url} holds no mmdata build to retry (no manifest.json or plan.parquet); "
                    "give --input and the build's options")
