"""Plan: list the inputs, group them into records, sort by key and cut into work units.

The plan is saved as ``plan.parquet`` before any unit runs, so a resumed run processes exactly
the same units whatever happened to the listing since.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import ipc

from mmdata.arrow import numpy_values
from mmdata.config import RUNTIME_FIELDS, BuildConfig
from mmdata.errors import UserError
from mmdata.keys import keys_to_ids, sanitize_keys
from mmdata.pipeline.plan_keys import _sorted_keys, reserve_derived_keys, reserved_column  # noqa: F401 (plan's API)
from mmdata.pipeline.plan_sort import PAYLOAD_SCHEMA, _max_open_files, _ranged, _Sample, _whole_units
from mmdata.records import Record, Unit, UnitRef
from mmdata.schema import PLAN_SCHEMA
from mmdata.sources.folder import walk_folder
from mmdata.sources.manifest import manifest_format, read_manifest_batches
from mmdata.storage import OutputDir

PLAN_FILE = "plan.parquet"
UNIT_DIGESTS = "unit_digests"  # plan.parquet metadata: the units' plan digests, in unit order


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
    """All records of the input, sorted by key (for small corpora and tests: a build never holds them all)."""
    with tempfile.TemporaryDirectory(prefix="mmdata-plan-") as tmp:
        return [r for table in planned_units(config, tmp) for r in table_records(table)]



BUCKET_ROWS = 1 << 20  # rows sorted in memory at once when the plan is cut into units (a multiple of units)

IN_MEMORY_ROWS = 1 << 20  # plans up to this many records are sorted in memory (faster; bounded by this constant)
RANGE_ROWS = 1 << 18  # records per key range of the external sort (the driver's memory is proportional to it)


def _input_batches(config: BuildConfig):
    """The input's records as Arrow tables (``raw_key`` + PAYLOAD_SCHEMA), in listing order; whether it is a manifest."""
    check_input(config.input)
    fs, path = fsspec.core.url_to_fs(config.input)
    fmt = manifest_format(config.input)
    if fmt and fs.isfile(path):
        batches = read_manifest_batches(config.input, config.image_col, config.text_col, config.key_col,
                                        audio_col=config.audio_col)
        return (t.append_column("problem", pa.nulls(t.num_rows, pa.string()))
                 .append_column("warnings", pa.array([[]] * t.num_rows, pa.list_(pa.string()))) for t in batches), True
    if fs.isdir(path):
        return walk_folder(config.input, exclude=config.out), False
    raise UserError(f"input {config.input} is neither a folder nor a manifest (.parquet .csv .tsv .jsonl)")


def planned_units(config: BuildConfig, tmp: str):
    """The plan as PLAN_SCHEMA tables of whole units, in unit order.

    Every record is spilled under ``tmp`` as it is listed (its raw name and its payload: sources,
    caption, metadata), with a bounded, deterministic sample of routing keys. A plan of up to
    IN_MEMORY_ROWS records is then sorted in memory; a bigger one by an external sort (``_ranged``):
    each record goes to the spill file of its key range, and the ranges are planned one at a time.
    Nothing is one Python object per record, and on the external path nothing on the driver grows
    with the number of records."""
    batches, is_manifest = _input_batches(config)
    key_chunks, n = [], 0
    sample = _Sample()
    payload_path, raw_path = os.path.join(tmp, "payload.arrow"), os.path.join(tmp, "raw.arrow")
    raw_schema = pa.schema([pa.field("raw_key", pa.string())])
    with pa.OSFile(payload_path, "wb") as sink, ipc.new_file(sink, PAYLOAD_SCHEMA) as writer, \
            pa.OSFile(raw_path, "wb") as raw_sink, ipc.new_file(raw_sink, raw_schema) as raw_writer:
        for t in batches:
            raw = t.column("raw_key").combine_chunks().cast(pa.string())
            keys = sanitize_keys(raw)
            sample.add(n, keys)
            if n + t.num_rows <= IN_MEMORY_ROWS:
                key_chunks.append(keys)  # most plans need nothing more than the sanitised names
            else:
                key_chunks.clear()  # too many to sort in memory: the external sort needs none of them
            raw_writer.write_table(pa.table([raw], schema=raw_schema))
            writer.write_table(t.select(PAYLOAD_SCHEMA.names).cast(PAYLOAD_SCHEMA))
            n += t.num_rows
    if not n:
        raise UserError(f"input {config.input} holds no records (empty folder or manifest)")
    if n > IN_MEMORY_ROWS:
        ranges = min(-(-n // RANGE_ROWS), _max_open_files() - 64)  # one open file per range while routing
        yield from _whole_units(_ranged(payload_path, raw_path, sample.splitters(ranges), is_manifest, tmp),
                                config.samples_per_shard)
        return
    keys, order = _sorted_keys(key_chunks, raw_path, is_manifest)
    ids = pa.array(keys_to_ids(keys))
    reserved = reserved_column(keys)
    sps = config.samples_per_shard
    per_bucket = max(sps, BUCKET_ROWS // sps * sps)
    with pa.OSFile(payload_path, "rb") as src:
        reader = ipc.open_file(src)
        if n <= per_bucket:
            buckets = iter([reader.read_all().take(order)])
        else:
            buckets = _bucketed(reader, numpy_values(order), n, per_bucket, tmp)
        del order
        start = 0
        for payload in buckets:  # whole units: a bucket holds a multiple of samples_per_shard rows
            size = payload.num_rows
            unit = (np.arange(start, start + size, dtype=np.int64) // sps).astype(np.int32)
            yield pa.table([pa.array(unit), keys.slice(start, size), ids.slice(start, size), payload.column("sources"),
                            payload.column("caption"), payload.column("meta"), payload.column("problem"),
                            payload.column("warnings"), reserved.slice(start, size)], schema=PLAN_SCHEMA)
            start += size


def _bucketed(reader, order: np.ndarray, n: int, per_bucket: int, tmp: str):
    """The spilled payload in sorted order, ``per_bucket`` rows at a time: each record is first
    written to its bucket's file (with its sort position), then each bucket is read back and sorted."""
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n, dtype=np.int64)
    del order
    n_buckets = -(-n // per_bucket)
    schema = PAYLOAD_SCHEMA.append(pa.field("rank", pa.int64()))
    paths = [os.path.join(tmp, f"bucket-{b:05d}.arrow") for b in range(n_buckets)]
    sinks = [pa.OSFile(p, "wb") for p in paths]
    writers = [ipc.new_file(s, schema) for s in sinks]
    try:
        row = 0
        for i in range(reader.num_record_batches):
            batch = pa.Table.from_batches([reader.get_batch(i)])
            ranks = rank[row:row + batch.num_rows]
            row += batch.num_rows
            bucket = ranks // per_bucket
            by = np.argsort(bucket, kind="stable")
            batch = batch.append_column("rank", pa.array(ranks)).take(pa.array(by))
            bounds = np.searchsorted(bucket[by], np.arange(n_buckets + 1))
            for b in range(n_buckets):
                if bounds[b + 1] > bounds[b]:
                    writers[b].write_table(batch.slice(bounds[b], bounds[b + 1] - bounds[b]))
    finally:
        for w, s in zip(writers, sinks):
            w.close()
            s.close()
    del rank
    for path in paths:
        with pa.OSFile(path, "rb") as src:
            table = ipc.open_file(src).read_all()
        os.unlink(path)
        table = table.take(pc.sort_indices(table.column("rank")))
        yield table.drop_columns(["rank"])


def table_digest(table: pa.Table) -> str:
    """The plan digest of a unit's rows (PLAN_SCHEMA columns): keys, ids, sources, captions,
    metadata, problems and reserved keys, hashed column by column from their Arrow buffers."""
    h = hashlib.sha256()
    for name in ("key", "id", "sources", "caption", "meta", "problem", "reserved"):
        col = table.column(name).combine_chunks()
        h.update(name.encode() + b"\0")
        if name == "id":
            h.update(np.ascontiguousarray(numpy_values(col), dtype="<i8").tobytes())
            continue
        if name == "reserved":
            h.update(numpy_values(pc.fill_null(pc.list_value_length(col), pa.scalar(-1, pa.int32()))).astype("<i8").tobytes())
            col = col.flatten()
        _hash_strings(h, col)
    return h.hexdigest()[:32]


def _hash_strings(h, col: pa.Array) -> None:
    """Lengths (-1 for null) then bytes of a string array, whatever its offset in its buffers."""
    h.update(numpy_values(pc.fill_null(pc.binary_length(col), pa.scalar(-1, pa.int32()))).astype("<i8").tobytes())
    if len(col):
        offsets = np.frombuffer(col.buffers()[1], dtype=np.int32)[col.offset: col.offset + len(col) + 1]
        data = col.buffers()[2]
        if data is not None and offsets[-1] > offsets[0]:
            h.update(memoryview(data)[offsets[0]:offsets[-1]])


def records_table(records: list[Record], unit: int = 0) -> pa.Table:
    """Records as plan rows (PLAN_SCHEMA)."""
    rows = [{"unit": unit, "key": r.key, "id": r.id, "sources": json.dumps(r.sources, sort_keys=True),
             "caption": r.caption, "meta": json.dumps(r.meta, sort_keys=True, default=str), "problem": r.problem,
             "warnings": r.warnings, "reserved": r.reserved or None} for r in records]
    return pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)


def table_records(table: pa.Table) -> list[Record]:
    """Plan rows as records."""
    return [Record(key=row["key"], id=row["id"], sources=json.loads(row["sources"]), caption=row["caption"],
                   meta=json.loads(row["meta"]), problem=row["problem"], warnings=list(row["warnings"] or []),
                   reserved=list(row.get("reserved") or [])) for row in table.to_pylist()]


def cut_units(records: list[Record], samples_per_shard: int) -> list[Unit]:
    return [Unit(i, records[s : s + samples_per_shard]) for i, s in enumerate(range(0, len(records), samples_per_shard))]


def _plan_file(out: OutputDir):
    return out.fs.open(out.path(PLAN_FILE), "rb")


def save_plan(out: OutputDir, config: BuildConfig) -> list[UnitRef]:
    """Plan the input and write ``plan.parquet``: one row group per unit, the units' digests in its
    metadata (``unit_digests``) with the config hash and content. Returns the units."""
    meta = {"config_hash": config.config_hash, "config": json.dumps(config.content_dict(), sort_keys=True)}
    refs: list[UnitRef] = []
    with tempfile.TemporaryDirectory(prefix="mmdata-plan-") as tmp, out.atomic_open(PLAN_FILE) as fh:
        writer = None
        try:
            sps = config.samples_per_shard
            for table in planned_units(config, tmp):
                if writer is None:
                    writer = pq.ParquetWriter(fh, PLAN_SCHEMA.with_metadata(meta), write_statistics=False)
                writer.write_table(table, row_group_size=sps)  # row groups cut every sps rows: one per unit
                for lo in range(0, table.num_rows, sps):
                    part = table.slice(lo, sps)
                    refs.append(UnitRef(len(refs), part.num_rows, table_digest(part)))
            writer.add_key_value_metadata({UNIT_DIGESTS: json.dumps([r.digest for r in refs])})
        finally:
            if writer is not None:
                writer.close()
    return refs


def load_plan(out: OutputDir) -> tuple[list[UnitRef], str]:
    """The saved units (index, size, digest: not their records) and the config hash they were planned with."""
    with _plan_file(out) as fh:
        pf = pq.ParquetFile(fh)
        meta = pf.metadata.metadata or {}
        config_hash = meta.get(b"config_hash", b"").decode()
        if UNIT_DIGESTS.encode() in meta:
            digests = json.loads(meta[UNIT_DIGESTS.encode()])
            return [UnitRef(i, pf.metadata.row_group(i).num_rows, d) for i, d in enumerate(digests)], config_hash
        table = pf.read()  # a plan written before units had row groups of their own
    units = numpy_values(table.column("unit"))
    return [UnitRef(int(i), int((units == i).sum()), table_digest(table.filter(pc.equal(table.column("unit"), i))))
            for i in np.unique(units)], config_hash


_FOOTERS: dict = {}  # per worker process: the plan's footer and unit digests, by file identity


def _footer(out: OutputDir):
    """``(FileMetaData, unit digests or None)`` of the output's plan, parsed once per process for
    as long as the file is the same (its size and modification time): a plan of many units has a
    footer of ~700 bytes per unit, which every unit would otherwise parse again."""
    path = out.path(PLAN_FILE)
    info = out.fs.info(path)
    stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("created")
    key = (out.url, path, info.get("size"), str(stamp)) if stamp is not None else None
    if key is not None and key in _FOOTERS:
        return _FOOTERS[key]
    with _plan_file(out) as fh:
        md = pq.ParquetFile(fh).metadata
    kv = md.metadata or {}
    found = (md, json.loads(kv[UNIT_DIGESTS.encode()]) if UNIT_DIGESTS.encode() in kv else None)
    if key is not None:
        _FOOTERS.clear()  # one plan at a time
        _FOOTERS[key] = found
    return found


def unit_ref(out: OutputDir, index: int) -> UnitRef:
    """Unit ``index`` of the saved plan (its size and digest), from the plan's footer."""
    md, digests = _footer(out)
    if digests is not None:
        return UnitRef(index, md.row_group(index).num_rows, digests[index])
    unit, digest = load_unit(out, index)
    return UnitRef(index, len(unit.records), digest)


def load_unit(out: OutputDir, index: int) -> tuple[Unit, str]:
    """Unit ``index``'s records, read from its own row group of ``plan.parquet``, and its plan digest."""
    md, digests = _footer(out)
    with _plan_file(out) as fh:
        pf = pq.ParquetFile(fh, metadata=md)
        if digests is not None:
            table = pf.read_row_group(index)  # typed scalars: inferring one's type makes pyarrow import pandas
            if len(table) and pc.any(pc.not_equal(table.column("unit"), pa.scalar(index, pa.int32()))).as_py():
                raise RuntimeError(f"{out.url}/{PLAN_FILE}: row group {index} holds another unit")
            digest = digests[index]
        else:  # a plan written before units had row groups of their own
            table = pf.read()
            table = table.filter(pc.equal(table.column("unit"), pa.scalar(index, pa.int32())))
            digest = table_digest(table)
    return Unit(index, table_records(table)), digest


def make_or_load_plan(config: BuildConfig, out: OutputDir) -> tuple[list[UnitRef], bool]:
    """Units for this build: the saved plan when resuming, else a fresh one (saved). Returns (units, resumed)."""
    if out.exists(PLAN_FILE) and not config.overwrite:
        units, planned_hash = load_plan(out)
        if planned_hash != config.config_hash:
            raise UserError(config_mismatch(out, planned_hash, config))
        return units, True
    return save_plan(out, config), False


def _planned_config(out: OutputDir) -> dict | None:
    """The output-deciding config fields the plan was made with: from the plan's metadata, else
    (plans written before it was kept there) from a finished build's manifest.json."""
    with _plan_file(out) as fh:
        meta = pq.ParquetFile(fh).schema_arrow.metadata or {}
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
