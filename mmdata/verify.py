"""verify: re-read every shard of an output and check it against sizes.json and the parquet tables."""
from __future__ import annotations

import io
import json

import pyarrow.parquet as pq

from mmdata.storage import OutputDir
from mmdata.writers.tar import read_tar_samples


def verify_output(url: str) -> list[str]:
    """Every inconsistency found in the output at ``url`` (an empty list means it is sound)."""
    out = OutputDir(url)
    problems: list[str] = []
    if not out.exists("shards/sizes.json"):
        return [f"{url}: no shards/sizes.json (build not finalized?)"]
    sizes = json.loads(out.read_bytes("shards/sizes.json"))
    manifest = json.loads(out.read_bytes("manifest.json")) if out.exists("manifest.json") else {}
    totals = {"inputs": 0, "written": 0, "filtered": 0, "failed": 0}
    for tar_name, expected in sorted(sizes.items()):
        name = tar_name[: -len(".tar")]
        try:
            samples = read_tar_samples(io.BytesIO(out.read_bytes(f"shards/{tar_name}")))
        except (OSError, EOFError, ValueError) as exc:
            problems.append(f"{tar_name}: unreadable tar ({exc})")
            continue
        table = pq.read_table(io.BytesIO(out.read_bytes(f"shards/{name}.parquet"))).to_pylist()
        written_keys = [r["key"] for r in table if r["status"] == "written"]
        for row in table:
            totals["inputs"] += 1
            totals[row["status"]] += 1
            if row["status"] != "written" and not row["reason"]:
                problems.append(f"{name}.parquet: {row['key']} is {row['status']} without a reason")
        if len(samples) != expected:
            problems.append(f"{tar_name}: {len(samples)} samples, sizes.json says {expected}")
        if [k for k, _ in samples] != written_keys:
            problems.append(f"{tar_name}: sample keys differ from the written rows of {name}.parquet")
        if [r["row"] for r in table if r["status"] == "written"] != list(range(len(written_keys))):
            problems.append(f"{name}.parquet: written rows are not numbered 0..n-1 in order")
        for key, members in samples:
            if "json" not in members:
                problems.append(f"{tar_name}: sample {key} has no json member")
    if manifest.get("counts") and manifest["counts"] != totals:
        problems.append(f"manifest.json counts {manifest['counts']} differ from the shards' {totals}")
    if totals["inputs"] != totals["written"] + totals["filtered"] + totals["failed"]:
        problems.append(f"counts do not reconcile: {totals}")
    return problems
