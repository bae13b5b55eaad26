"""verify: re-read every shard of an output and check it against the plan, sizes.json, the parquet
tables, the units' stats and the embedding files."""
from __future__ import annotations

import io
import json
import posixpath
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmdata.arrow import parquet_table
from mmdata.embed_switch import finish_switch
from mmdata.errors import UserError
from mmdata.layout import offsets_file
from mmdata.pipeline.unique_ids import duplicate_ids
from mmdata.storage import OutputDir
from mmdata.writers.offsets import scan_offsets
from mmdata.writers.tar import read_tar_samples

STATUSES = ("written", "filtered", "failed")


def _read_table(out: OutputDir, rel: str, problems: list[str]):
    # use_threads=False: a small table gains nothing from Arrow's pool, whose teardown at exit can
    # abort the process now and then (apache/arrow#34314), turning exit 1 into a SIGABRT
    try:
        return parquet_table(out.read_bytes(rel), use_threads=False)
    except FileNotFoundError:
        problems.append(f"{rel}: missing")
    except (OSError, pa.ArrowException) as exc:
        problems.append(f"{rel}: unreadable ({exc})")
    return None


def _read_json(out: OutputDir, rel: str, problems: list[str]):
    try:
        return json.loads(out.read_bytes(rel))
    except FileNotFoundError:
        problems.append(f"{rel}: missing")
    except (OSError, ValueError) as exc:
        problems.append(f"{rel}: unreadable ({exc})")
    return None


def _plan_records(out: OutputDir, problems: list[str]) -> dict[int, int] | None:
    """Records per unit in ``plan.parquet`` (None for an output without a plan)."""
    if not out.exists("plan.parquet"):
        return None
    try:  # the unit column alone, read from the file: a plan can hold millions of rows
        with out.fs.open(out.path("plan.parquet"), "rb") as fh:
            units = pq.read_table(fh, columns=["unit"], use_threads=False).column("unit").to_numpy()
    except (OSError, pa.ArrowException) as exc:
        problems.append(f"plan.parquet: unreadable ({exc})")
        return None
    return {i: int(n) for i, n in enumerate(np.bincount(units)) if n} if len(units) else {}


def _check_embeddings(out: OutputDir, name: str, modalities: list[str], n_written: int, problems: list[str]) -> None:
    for modality in modalities:
        rel = f"embeddings/{modality}/{name}.npy"
        try:
            rows = np.load(io.BytesIO(out.read_bytes(rel)), allow_pickle=False)
        except FileNotFoundError:
            problems.append(f"{rel}: missing")
            continue
        except (OSError, ValueError) as exc:
            problems.append(f"{rel}: unreadable ({exc})")
            continue
        if rows.ndim != 2 or rows.shape[0] != n_written:
            problems.append(f"{rel}: shape {rows.shape}, but {name} has {n_written} written rows")
        elif not np.isfinite(rows.astype(np.float32)).all():
            problems.append(f"{rel}: non-finite values")


def _check_shard(out: OutputDir, tar_name: str, expected: int, modalities: list[str], plan: dict | None,
                 totals: Counter, problems: list[str]) -> None:
    name = tar_name[: -len(".tar")]
    try:
        tar_bytes = out.read_bytes(f"shards/{tar_name}")
        samples = read_tar_samples(io.BytesIO(tar_bytes))
    except FileNotFoundError:
        problems.append(f"shards/{tar_name}: missing (listed in sizes.json)")
        return
    except (OSError, EOFError, ValueError, tarfile.TarError) as exc:
        problems.append(f"{tar_name}: unreadable tar ({exc})")
        return
    table = _read_table(out, f"shards/{name}.parquet", problems)
    if table is None:
        return
    rows = table.to_pylist()
    status = Counter(r["status"] for r in rows)
    totals.update({"inputs": len(rows), **{s: status[s] for s in STATUSES}})
    for row in rows:
        if row["status"] not in STATUSES:
            problems.append(f"{name}.parquet: {row['key']} has status {row['status']!r}")
        elif row["status"] != "written" and not row["reason"]:
            problems.append(f"{name}.parquet: {row['key']} is {row['status']} without a reason")
    written_keys = [r["key"] for r in rows if r["status"] == "written"]
    if len(samples) != expected:
        problems.append(f"{tar_name}: {len(samples)} samples, sizes.json says {expected}")
    if [k for k, _ in samples] != written_keys:
        problems.append(f"{tar_name}: sample keys differ from the written rows of {name}.parquet")
    if [r["row"] for r in rows if r["status"] == "written"] != list(range(len(written_keys))):
        problems.append(f"{name}.parquet: written rows are not numbered 0..n-1 in order")
    for key, members in samples:
        if "json" not in members:
            problems.append(f"{tar_name}: sample {key} has no json member")
    stats = _read_json(out, f"shards/{name}_stats.json", problems)
    if stats is not None:
        counts = stats.get("counts", {})
        mine = {"inputs": len(rows), **{s: status[s] for s in STATUSES}}
        if {k: counts.get(k) for k in mine} != mine:
            problems.append(f"{name}_stats.json counts {counts} differ from {name}.parquet's {mine}")
        if plan is not None and counts.get("records") != plan.get(int(name)):
            problems.append(f"{name}_stats.json accounts for {counts.get('records')} records, "
                            f"the plan gives unit {int(name)} {plan.get(int(name))}")
    _check_embeddings(out, name, modalities, len(written_keys), problems)
    _check_offsets(out, name, tar_bytes, problems)


def _check_offsets(out: OutputDir, name: str, tar_bytes: bytes, problems: list[str]) -> None:
    """The offsets index, when the shard has one, names every member at its true offset and size."""
    rel = offsets_file(name)
    if not out.exists(rel):
        return  # built before offsets indexes existed: readers scan the tar headers instead
    doc = _read_json(out, rel, problems)
    if doc is None:
        return
    if [tuple(m) for m in doc.get("members", [])] != scan_offsets(io.BytesIO(tar_bytes)):
        problems.append(f"{rel}: does not match the members of {name}.tar")


def verify_output(url: str) -> list[str]:
    """Every inconsistency found in the output at ``url`` (an empty list means it is sound)."""
    return verify_report(url)[0]


def verify_report(url: str) -> tuple[list[str], dict]:
    """(every inconsistency found, what was checked: shards, samples, records, embedding files).

    Raises UserError when ``url`` is not a folder, or a folder with nothing of a build in it
    (a bad path, not a damaged output).
    """
    out = OutputDir(url)
    problems: list[str] = []
    checked = {"shards": 0, "samples": 0, "inputs": 0, "filtered": 0, "failed": 0, "embedding_files": 0}
    if not out.exists(""):
        raise UserError(f"{url}: no such folder")
    if not any(out.exists(rel) for rel in ("shards", "manifest.json", "plan.parquet")):
        raise UserError(f"{url}: not an mmdata output (no shards/, manifest.json or plan.parquet)")
    finish_switch(out)  # an `mmdata embed` killed during its switch: its journal says how to finish it
    if not out.exists("shards/sizes.json"):
        return [f"{url}: no shards/sizes.json (build not finalized?)"], checked
    sizes = _read_json(out, "shards/sizes.json", problems)
    if not isinstance(sizes, dict):
        return problems or [f"{url}: shards/sizes.json is not a mapping"], checked
    manifest = _read_json(out, "manifest.json", problems) if out.exists("manifest.json") else {}
    manifest = manifest or {}
    modalities = list((manifest.get("embeddings") or {}).get("modalities") or [])
    plan = _plan_records(out, problems)
    on_disk = {posixpath.basename(p) for p in out.glob("shards/*.tar")}
    for extra in sorted(on_disk - set(sizes)):
        problems.append(f"shards/{extra}: on disk but not in sizes.json")
    if plan is not None:
        planned = {f"{unit:05d}.tar" for unit in plan}
        for name in sorted(planned - set(sizes)):
            problems.append(f"plan unit {name[:-4]} has no shard in sizes.json")
    totals: Counter = Counter({k: 0 for k in ("inputs", *STATUSES)})
    for tar_name, expected in sorted(sizes.items()):
        _check_shard(out, tar_name, expected, modalities, plan, totals, problems)
    shards = [t[: -len(".tar")] for t in sorted(sizes) if out.exists(f"shards/{t[: -len('.tar')]}.parquet")]
    try:
        problems.extend(duplicate_ids(out, shards))
    except (OSError, pa.ArrowException, KeyError) as exc:
        problems.append(f"ids could not be checked for duplicates ({exc})")
    totals = dict(totals)
    if manifest.get("counts") and manifest["counts"] != totals:
        problems.append(f"manifest.json counts {manifest['counts']} differ from the shards' {totals}")
    if totals["inputs"] != totals["written"] + totals["filtered"] + totals["failed"]:
        problems.append(f"counts do not reconcile: {totals}")
    checked.update(shards=len(sizes), samples=totals["written"], inputs=totals["inputs"],
                   filtered=totals["filtered"], failed=totals["failed"],
                   embedding_files=len(sizes) * len(modalities), modalities=modalities)
    return problems, checked
