"""``report.html``: one self-contained page per build (counts, funnel with examples, per-shard
figures, plots, written samples, neighbours, an embedding map, provenance).

Written by finalize and re-made by ``mmdata report OUT``. It reads only the output folder (and,
for examples of removed samples, their local sources), never the build's code: this package imports
nothing from the pipeline, the engines or the driver.
"""
from __future__ import annotations

import json

from mmdata.errors import UserError
from mmdata.report import plots as _plots
from mmdata.report.collect import Collector, plot_columns
from mmdata.report.page import render
from mmdata.storage import OutputDir

REPORT_FILE = "report.html"


def make_report(out: OutputDir, manifest: dict | None = None) -> str:
    """The report of the finished output ``out`` as HTML text."""
    if manifest is None:
        if not out.exists("manifest.json"):
            raise UserError(f"{out.url} has no manifest.json (not a finished mmdata build)")
        try:
            manifest = json.loads(out.read_bytes("manifest.json"))
        except ValueError as exc:
            raise UserError(f"{out.url}/manifest.json is not valid JSON ({exc})") from None
        if "mmdata_version" not in manifest:
            raise UserError(f"{out.url}/manifest.json was not written by mmdata")
    manifest = json.loads(json.dumps(manifest, sort_keys=True))  # as on disk: the same page either way
    col = Collector(out, manifest)
    funnel, tables = col.funnel()
    grid = col.grid(tables)
    data = {"manifest": manifest, "funnel": funnel, "shards": col.shard_rows(), "grid": grid,
            "neighbours": col.neighbours(grid),
            "plots": _plots.distribution_plots(plot_columns(tables), manifest.get("config") or {}),
            "maps": _plots.embedding_maps(col.embedding_sample())}
    col.notes.append(f"plots, grid and embedding map from {len(tables)} of {len(col.shards)} shards; "
                     f"funnel counts from all shards")
    data["notes"] = col.notes
    return render(f"{out.url.rstrip('/').rsplit('/', 1)[-1]}: {manifest.get('counts', {}).get('written')} samples", data)


def write_report(out: OutputDir | str, manifest: dict | None = None) -> str:
    """Write ``OUT/report.html`` (atomically) and return its path or URL."""
    out = OutputDir(out) if isinstance(out, str) else out
    out.write_bytes(REPORT_FILE, make_report(out, manifest).encode("utf-8"))
    return out.path(REPORT_FILE)
