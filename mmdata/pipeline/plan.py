"""Plan: list the inputs, group them into records, sort by key and cut into work units.

The plan is saved as ``plan.parquet`` before any unit runs, so a resumed run processes exactly
the same units whatever happened to the listing since.
"""
from __future__ import annotations

import io
import json
import re
from collections import Counter

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from mmdata.config import RUNTIME_FIELDS, BuildConfig
from mmdata.errors import UserError
from mmdata.keys import key_to_id, unique_keys
from mmdata.records import Record, Unit
from mmdata.schema import PLAN_SCHEMA
from mmdata.sources.folder import list_folder
from mmdata.sources.manifest import manifest_format, read_manifest
from mmdata.storage import OutputDir

PLAN_FILE = "plan.parquet"


def _dedupe(raws: list[str]) -> list[str]:
    """Make repeated raw keys distinct by their occurrence number (manifest order)."""
    seen: Counter = Counter()
    out = []
    for raw in raws:
        out.append(raw if seen[raw] == 0 else f"{raw}#{seen[raw]}")
        seen[raw] += 1
    return out


def check_input(url: str) -> None:
    """A clear UserError when the input cannot be reached."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
        found = fs.exists(path)
    except (ImportError, ValueError) as exc:
        raise UserError(f"input {url}: {exc}") from None
    if not found:
        raise UserError(f"input {url} does not exist")


def list_records(config: BuildConfig) -> list[Record]:
    """All records of the input, sorted by key."""
    check_input(config.input)
    fs, path = fsspec.core.url_to_fs(config.input)
    fmt = manifest_format(config.input)
    if fmt and fs.isfile(path):
        rows = read_manifest(config.input, config.image_col, config.text_col, config.key_col)
        keys = unique_keys(_dedupe([r[0] for r in rows]))
        records = [Record(k, key_to_id(k), sources=s, caption=c, meta=m) for k, (_, s, c, m) in zip(keys, rows)]
    elif fs.isdir(path):
        groups = list_folder(config.input, exclude=config.out)
        keys = unique_keys([g[0] for g in groups])
        records = [
            Record(k, key_to_id(k), sources=s, warnings=w, problem=p) for k, (_, s, w, p) in zip(keys, groups)
        ]
    else:
        raise UserError(f"input {config.input} is neither a folder nor a manifest (.parquet .csv .tsv .jsonl)")
    if not records:
        raise UserError(f"input {config.input} holds no records (empty folder or manifest)")
    records.sort(key=lambda r: r.key)
    reserve_derived_keys(records)
    return records


_VIEW = re.compile(r"(.+)_v\d{2,}")
_SEGMENT = re.compile(r"(.+)_s\d{4,}(?:_p\d{2,})?")


def reserve_derived_keys(records: list[Record]) -> None:
    """Give each record the planned keys that its segments or views could take (a file literally
    named ``cat_s0001.jpg`` beside ``cat.wav`` + ``cat.srt``, or ``cat_v01`` beside ``cat``), wherever
    in the corpus they are: a derived key in ``record.reserved`` gets a suffix hashed from its
    parent's key (``unit.in_key_order``), so no key is written twice across shards. Depends only
    on the set of keys: stable across runs."""
    by_key = {r.key: r for r in records}
    for key in by_key:
        parents = []
        rest = key
        m = _VIEW.fullmatch(key)
        if m:
            parents.append(m[1])
            rest = m[1]
        m = _SEGMENT.fullmatch(rest)
        if m:
            parents.append(m[1])
        for parent in parents:
            if parent in by_key and parent != key:
                by_key[parent].reserved.append(key)


def cut_units(records: list[Record], samples_per_shard: int) -> list[Unit]:
    return [Unit(i, records[s : s + samples_per_shard]) for i, s in enumerate(range(0, len(records), samples_per_shard))]


def plan_table(units: list[Unit], config_hash: str, content: dict | None = None) -> pa.Table:
    """The plan as a table; ``content`` (the config's output-deciding fields) is kept in its
    metadata so that a resume with another config can say which fields changed."""
    rows = [
        {
            "unit": u.index,
            "key": r.key,
            "id": r.id,
            "sources": json.dumps(r.sources, sort_keys=True),
            "caption": r.caption,
            "meta": json.dumps(r.meta, sort_keys=True, default=str),
            "problem": r.problem,
            "warnings": r.warnings,
            "reserved": r.reserved or None,
        }
        for u in units
        for r in u.records
    ]
    table = pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)
    meta = {"config_hash": config_hash}
    if content is not None:
        meta["config"] = json.dumps(content, sort_keys=True)
    return table.replace_schema_metadata(meta)


def save_plan(out: OutputDir, units: list[Unit], config_hash: str, content: dict | None = None) -> None:
    buf = io.BytesIO()
    pq.write_table(plan_table(units, config_hash, content), buf)
    out.write_bytes(PLAN_FILE, buf.getvalue())


def load_plan(out: OutputDir) -> tuple[list[Unit], str]:
    """The saved units and the config hash they were planned with."""
    table = pq.read_table(io.BytesIO(out.read_bytes(PLAN_FILE)))
    config_hash = (table.schema.metadata or {}).get(b"config_hash", b"").decode()
    by_unit: dict[int, list[Record]] = {}
    for row in table.to_pylist():
        rec = Record(
            key=row["key"],
            id=row["id"],
            sources=json.loads(row["sources"]),
            caption=row["caption"],
            meta=json.loads(row["meta"]),
            problem=row["problem"],
            warnings=list(row["warnings"] or []),
            reserved=list(row.get("reserved") or []),
        )
        by_unit.setdefault(row["unit"], []).append(rec)
    return [Unit(i, by_unit[i]) for i in sorted(by_unit)], config_hash


def make_or_load_plan(config: BuildConfig, out: OutputDir) -> tuple[list[Unit], bool]:
    """Units for this build: the saved plan when resuming, else a fresh one (saved). Returns (units, resumed)."""
    if out.exists(PLAN_FILE) and not config.overwrite:
        units, planned_hash = load_plan(out)
        if planned_hash != config.config_hash:
            raise UserError(config_mismatch(out, planned_hash, config))
        return units, True
    units = cut_units(list_records(config), config.samples_per_shard)
    save_plan(out, units, config.config_hash, config.content_dict())
    return units, False


def _planned_config(out: OutputDir) -> dict | None:
    """The output-deciding config fields the plan was made with: from the plan's metadata, else
    (plans written before it was kept there) from a finished build's manifest.json."""
    meta = pq.read_schema(io.BytesIO(out.read_bytes(PLAN_FILE))).metadata or {}
    if b"config" in meta:
        return json.loads(meta[b"config"])
    if out.exists("manifest.json"):
        try:
            return json.loads(out.read_bytes("manifest.json")).get("config")
        except ValueError:
            return None
    return None


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def config_mismatch(out: OutputDir, planned_hash: str, config: BuildConfig) -> str:
    """The one-line refusal to resume with another config: the fields that changed and the ways out."""
    before, now = _planned_config(out), config.content_dict()
    changes = []
    if before is not None:
        unset = object()
        for k in sorted((set(before) | set(now)) - RUNTIME_FIELDS):
            old, new = before.get(k, unset), now.get(k, unset)
            if old != new:
                changes.append(f"{k}: {'(not set)' if old is unset else _short(old)} → "
                               f"{'(not set)' if new is unset else _short(new)}")
    what = ", ".join(changes) if changes else f"config hash {planned_hash} → {config.config_hash}"
    return (f"{out.url} was built with another configuration ({what}); either run with the same settings "
            f"to resume, or pass --overwrite to rebuild it (or choose another --out)")
