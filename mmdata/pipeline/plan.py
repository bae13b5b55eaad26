"""Plan: list the inputs, group them into records, sort by key and cut into work units.

The plan is saved as ``plan.parquet`` before any unit runs, so a resumed run processes exactly
the same units whatever happened to the listing since.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import ipc

from mmdata.config import RUNTIME_FIELDS, BuildConfig
from mmdata.errors import UserError
from mmdata.keys import keys_to_ids, sanitize_keys, unique_keys_arrow
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


_VIEW = re.compile(r"(.+)_v\d{2,}")
_SEGMENT = re.compile(r"(.+)_s\d{4,}(?:_p\d{2,})?")
_DERIVED = r"^.+_(v\d{2,}|s\d{4,}(_p\d{2,})?)$"  # keys that a view or a segment of another key could take


def reserve_derived_keys(records: list[Record]) -> None:
    """Give each record the planned keys that its segments or views could take (a file literally
    named ``cat_s0001.jpg`` beside ``cat.wav`` + ``cat.srt``, or ``cat_v01`` beside ``cat``), wherever
    in the corpus they are: a derived key in ``record.reserved`` gets a suffix hashed from its
    parent's key (``unit.in_key_order``), so no key is written twice across shards. Depends only
    on the set of keys: stable across runs."""
    by_key = {r.key: r for r in records}
    for key in by_key:
        for parent in _parents(key):
            if parent in by_key and parent != key:
                by_key[parent].reserved.append(key)


def _parents(key: str) -> list[str]:
    parents = []
    rest = key
    m = _VIEW.fullmatch(key)
    if m:
        parents.append(m[1])
        rest = m[1]
    m = _SEGMENT.fullmatch(rest)
    if m:
        parents.append(m[1])
    return parents


def reserved_column(keys: pa.Array) -> pa.Array:
    """``reserve_derived_keys`` for the sorted key array ``keys``: each row's list of derived keys (null
    when none). Only keys that look derived are looked at in Python; parents are found by Arrow."""
    n = len(keys)
    derived = pc.fill_null(pc.match_substring_regex(keys, _DERIVED), False)
    none = pa.nulls(n, pa.list_(pa.string()))
    if not pc.any(derived).as_py():
        return none
    cand = pc.unique(keys.filter(derived)).to_pylist()  # sorted, as keys are
    pairs = [(p, k) for k in cand for p in _parents(k) if p != k]
    if not pairs:
        return none
    parents = pa.array([p for p, _ in pairs], pa.string())
    # the last row holding the parent's key (``by_key`` keeps the last record of a key)
    where = pc.index_in(parents, value_set=keys[::-1])
    found = pc.is_valid(where)
    if not pc.any(found).as_py():
        return none
    rows = (n - 1) - where.filter(found).to_numpy().astype(np.int64)
    children = np.array([k for (_, k), f in zip(pairs, found.to_pylist()) if f], dtype=object)
    order = np.argsort(rows, kind="stable")  # per row, children in key order (cand is sorted)
    rows, children = rows[order], children[order]
    counts = np.bincount(rows, minlength=n)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(children.tolist(), pa.string()),
                                    mask=pa.array(counts == 0))


def _sorted_keys(key_chunks: list, raw_path: str, is_manifest: bool) -> tuple[pa.Array, pa.Array]:
    """The records' keys in sorted order, and the sort (listing row of each sorted key): ``_dedupe``
    (manifests) then ``unique_keys`` of the raw names, then a stable sort. Equal neighbours after one
    sort of the sanitised names show whether there is anything to dedupe or disambiguate at all; only
    then are the raw names (spilled at ``raw_path``) read back."""
    keys = pa.chunked_array(key_chunks, pa.string())
    key_chunks.clear()  # the caller's list: these chunks are now held here only
    order = pc.sort_indices(keys)  # stable: equal keys keep their listing order
    keys = keys.take(order).combine_chunks()
    n = len(keys)
    if n > 1 and pc.any(pc.equal(keys.slice(1), keys.slice(0, n - 1))).as_py():
        del keys, order
        with pa.OSFile(raw_path, "rb") as src:
            raws = ipc.open_file(src).read_all().column("raw_key").combine_chunks()
        raws = _dedupe_arrow(raws) if is_manifest else raws
        keys = unique_keys_arrow(raws)
        del raws
        order = pc.sort_indices(keys)
        keys = keys.take(order)
    return keys, order


def _dedupe_arrow(raws: pa.Array) -> pa.Array:
    """``_dedupe`` of an Arrow string array: the n-th repeat of a raw key (manifest order) gets ``#n``."""
    n = len(raws)
    if n < 2 or pc.count_distinct(raws).as_py() == n:
        return raws
    order = pc.sort_indices(raws)  # stable: repeats keep their manifest order
    s = raws.take(order)
    same = np.zeros(n, dtype=bool)
    same[1:] = pc.equal(s.slice(1), s.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    if not same.any():
        return raws
    starts = np.maximum.accumulate(np.where(~same, np.arange(n), 0))
    occurrence = np.empty(n, dtype=np.int64)
    occurrence[order.to_numpy()] = np.arange(n) - starts
    repeat = occurrence > 0
    suffix = pa.array(occurrence, mask=~repeat).cast(pa.string())
    return pc.if_else(pa.array(repeat), pc.binary_join_element_wise(raws, suffix, "#"), raws)


PAYLOAD_SCHEMA = pa.schema([PLAN_SCHEMA.field(name) for name in ("sources", "caption", "meta", "problem", "warnings")])
BUCKET_ROWS = 1 << 20  # rows sorted in memory at once when the plan is cut into units (a multiple of units)


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
            buckets = _bucketed(reader, order.to_numpy(), n, per_bucket, tmp)
        del order
        start = 0
        for payload in buckets:  # whole units: a bucket holds a multiple of samples_per_shard rows
            size = payload.num_rows
            unit = (np.arange(start, start + size, dtype=np.int64) // sps).astype(np.int32)
            yield pa.table([pa.array(unit), keys.slice(start, size), ids.slice(start, size), payload.column("sources"),
                            payload.column("caption"), payload.column("meta"), payload.column("problem"),
                            payload.column("warnings"), reserved.slice(start, size)], schema=PLAN_SCHEMA)
            start += size


# --- the external sort: bounded memory, whatever the number of records ---------------------------------------
#
# Each record is routed by its *routing key* v: its sanitised raw name (the first ROUTE_PREFIX characters, right-
# stripped of ``_``, when longer; for a manifest row whose name sanitises to nothing, the key its repeat number
# gives it, ``k``, ``1``, ``2``...). Every key the plan can give a record, and every name it is compared with
# (``_dedupe``'s repeats ``v_1``, ``unique_keys``' hashed suffixes, a view's or segment's parent), is ``>= v`` and
# starts with v, so a record never lands before its range. Ranges are cut at splitters chosen from the sample;
# a range is planned in memory exactly as the whole plan would be, then checked: if a key or sanitised name in it
# reaches the next range's first splitter, or a derived key in it has its parent in an earlier range, the ranges
# concerned are merged and planned again. The result is therefore the in-memory plan, byte for byte.

IN_MEMORY_ROWS = 1 << 20  # plans up to this many records are sorted in memory (faster; bounded by this constant)
RANGE_ROWS = 1 << 18  # records per key range of the external sort (the driver's memory is proportional to it)
SAMPLE_ROWS = 1 << 16  # routing keys sampled to choose the splitters
ROUTE_PREFIX = 100  # routing keys longer than this are cut here (their planned keys all start with the cut)


class _Sample:
    """Every k-th record's routing key (k doubles whenever more than SAMPLE_ROWS are held): the same
    sample for the same input on every run, bounded whatever its size."""

    def __init__(self):
        self.k, self.rows, self.keys = 1, [], []

    def add(self, start: int, keys: pa.Array) -> None:
        first = (-start) % self.k
        pick = np.arange(first, len(keys), self.k)
        if len(pick):
            self.rows.append(pick + start)
            self.keys.append(_routing_keys(keys.take(pa.array(pick))))
        while sum(len(r) for r in self.rows) > SAMPLE_ROWS:
            self.k *= 2
            keep = [r % self.k == 0 for r in self.rows]
            self.keys = [k.filter(pa.array(m)) for k, m in zip(self.keys, keep)]
            self.rows = [r[m] for r, m in zip(self.rows, keep)]

    def splitters(self, ranges: int) -> pa.Array:
        """Up to ``ranges - 1`` distinct splitters, sorted, cutting the sample into equal parts."""
        if ranges < 2 or not self.keys:
            return pa.array([], pa.string())
        keys = pa.concat_arrays(self.keys)
        keys = keys.take(pc.sort_indices(keys))
        at = [len(keys) * i // ranges for i in range(1, ranges)]
        return pc.unique(keys.take(pa.array(at, pa.int64())))


def _max_open_files() -> int:
    """The process's limit on open files (raised to its hard limit): the routing pass holds one per range.
    Beyond it (20,000 ranges of RANGE_ROWS: 5 G records here) ranges grow instead."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        return soft if soft != resource.RLIM_INFINITY else 1 << 20
    except (ImportError, ValueError, OSError):
        return 1024


def _routing_keys(keys: pa.Array) -> pa.Array:
    """The routing key of each sanitised name: the name, or its first ROUTE_PREFIX characters when longer."""
    long = pc.greater(pc.binary_length(keys), ROUTE_PREFIX)
    if not pc.any(long).as_py():
        return keys
    cut = pc.utf8_rtrim(pc.utf8_slice_codeunits(keys, 0, ROUTE_PREFIX), characters="_")
    return pc.if_else(long, cut, keys)


def _range_of(values: pa.Array, splitters: pa.Array) -> np.ndarray:
    """For each value, how many splitters are ``<=`` it: its range (one Arrow sort, no Python per value)."""
    m = len(splitters)
    if not m:
        return np.zeros(len(values), dtype=np.int32)
    order = pc.sort_indices(pa.concat_arrays([splitters, values])).to_numpy()  # stable: a splitter before its equal
    is_split = order < m
    ranks = np.cumsum(is_split).astype(np.int32)
    out = np.empty(len(values), dtype=np.int32)
    out[order[~is_split] - m] = ranks[~is_split]
    return out


# a range's spill file: the raw name (repeat suffix given when ``fixed``), the listing row, the payload
RANGE_SCHEMA = pa.schema([pa.field("raw_key", pa.string()), pa.field("fixed", pa.bool_()), pa.field("row", pa.int64()),
                          *PAYLOAD_SCHEMA])


def _route(payload_path: str, raw_path: str, splitters: pa.Array, is_manifest: bool, tmp: str) -> list[str]:
    """Write every spilled record (raw name, listing row, payload) to its range's file, in listing order. A
    manifest row whose name sanitises to nothing gets its repeat suffix here (``_dedupe``), counted per such
    name: a range could not count them, as their keys land in other ranges."""
    paths = [os.path.join(tmp, f"range-{r:05d}.arrow") for r in range(len(splitters) + 1)]
    sinks = [pa.OSFile(p, "wb") for p in paths]
    writers = [ipc.new_file(s, RANGE_SCHEMA) for s in sinks]
    repeats: dict[str, int] = {}  # per distinct name made only of unsafe characters (``""``, ``"."``, ...)
    try:
        with pa.OSFile(payload_path, "rb") as psrc, pa.OSFile(raw_path, "rb") as rsrc:
            payload, raws = ipc.open_file(psrc), ipc.open_file(rsrc)
            row = 0
            for i in range(payload.num_record_batches):
                raw = raws.get_batch(i).column(0)
                batch = payload.get_batch(i)
                keys = sanitize_keys(raw)
                fixed = np.zeros(len(raw), dtype=bool)
                if is_manifest:
                    empty = pc.and_(pc.equal(keys, "k"), pc.invert(pc.match_substring(raw, "k")))
                    if pc.any(empty).as_py():
                        fixed = empty.to_numpy(zero_copy_only=False)
                        named = []
                        for name in raw.filter(empty).to_pylist():
                            seen = repeats.get(name, 0)
                            repeats[name] = seen + 1
                            named.append(name if seen == 0 else f"{name}#{seen}")
                        raw = pc.replace_with_mask(raw, pa.array(fixed), pa.array(named, pa.string()))
                        keys = sanitize_keys(raw)
                ranges = _range_of(_routing_keys(keys), splitters)
                table = pa.table([raw, pa.array(fixed), pa.array(np.arange(row, row + len(raw), dtype=np.int64)),
                                  *batch.columns], schema=RANGE_SCHEMA)
                row += len(raw)
                by = np.argsort(ranges, kind="stable")
                table = table.take(pa.array(by))
                bounds = np.searchsorted(ranges[by], np.arange(len(paths) + 1))
                for r in np.flatnonzero(bounds[1:] > bounds[:-1]):
                    writers[r].write_table(table.slice(bounds[r], bounds[r + 1] - bounds[r]))
    finally:
        for w, s in zip(writers, sinks):
            w.close()
            s.close()
    return paths


def _read_ranges(paths: list[str], columns: list[str] | None = None) -> pa.Table:
    """The records of consecutive ranges, in listing order."""
    tables = []
    for path in paths:
        with pa.memory_map(path) as src:
            t = ipc.open_file(src).read_all()
        tables.append(t.select(columns) if columns else t)
    table = pa.concat_tables(tables)
    if len(paths) > 1:
        table = table.take(pc.sort_indices(table.column("row")))
    return table.combine_chunks()


def _range_keys(table: pa.Table, is_manifest: bool) -> tuple[pa.Array, pa.Array, str | None]:
    """``_sorted_keys`` of a range's records: their keys in sorted order, the sort, and the greatest
    sanitised name of a deduplicated raw name (None when nothing needed deduplicating)."""
    raws = table.column("raw_key").combine_chunks()
    keys = sanitize_keys(raws)
    order = pc.sort_indices(keys)
    keys = keys.take(order)
    n = len(keys)
    if n > 1 and pc.any(pc.equal(keys.slice(1), keys.slice(0, n - 1))).as_py():
        if is_manifest:
            fixed = table.column("fixed").combine_chunks()
            if pc.any(fixed).as_py():
                keep = pc.invert(fixed)
                raws = pc.replace_with_mask(raws, keep, _dedupe_arrow(raws.filter(keep)))
            else:
                raws = _dedupe_arrow(raws)
        top = pc.max(sanitize_keys(raws)).as_py()
        keys = unique_keys_arrow(raws)
        order = pc.sort_indices(keys)
        keys = keys.take(order)
        return keys, order, top
    return keys, order, None


def _check_range(table: pa.Table, is_manifest: bool, lower: str | None, prefixes: pa.Array):
    """What the merging of ranges needs to know of a range: the greatest name it gives (key or sanitised
    name), the parents (before ``lower``) its derived keys look for, and which splitter prefixes are its keys."""
    if not table.num_rows:
        return None, set(), set()
    keys, _, top = _range_keys(table, is_manifest)
    greatest = keys[-1].as_py()
    if top is not None and top > greatest:
        greatest = top
    looked_for = set()
    if lower is not None:
        derived = pc.fill_null(pc.match_substring_regex(keys, _DERIVED), False)
        if pc.any(derived).as_py():
            for k in pc.unique(keys.filter(derived)).to_pylist():
                looked_for.update(p for p in _parents(k) if p != k and p < lower)
    held = set(pc.unique(keys.filter(pc.is_in(keys, value_set=prefixes))).to_pylist()) if len(prefixes) else set()
    return greatest, looked_for, held


def _ranged(payload_path: str, raw_path: str, splitters: pa.Array, is_manifest: bool, tmp: str):
    """The plan's rows (PLAN_SCHEMA less ``unit``), sorted, one group of ranges at a time."""
    paths = _route(payload_path, raw_path, splitters, is_manifest, tmp)
    os.unlink(payload_path)
    os.unlink(raw_path)
    cuts = splitters.to_pylist()
    prefixes = pa.array(sorted({s[:i] for s in cuts for i in range(1, len(s))}), pa.string())
    groups = [(r, r + 1) for r in range(len(paths))]
    checked: dict = {}
    while True:
        for lo, hi in groups:
            if (lo, hi) not in checked:
                table = _read_ranges(paths[lo:hi], ["raw_key", "fixed", "row"])
                checked[(lo, hi)] = _check_range(table, is_manifest, cuts[lo - 1] if lo else None, prefixes)
                del table
        merge = None
        for i, (lo, hi) in enumerate(groups[:-1]):
            greatest = checked[(lo, hi)][0]
            if greatest is not None and greatest >= cuts[hi - 1]:  # a name reaches the next range
                merge = (i, i + 1)
                break
        if merge is None:
            holder = {p: i for i, g in enumerate(groups) for p in checked[g][2]}
            for i, g in enumerate(groups):
                found = [holder[p] for p in checked[g][1] if p in holder]
                if found:  # a derived key whose parent is in an earlier range
                    merge = (min(found), i)
                    break
        if merge is None:
            break
        a, b = merge
        groups[a:b + 1] = [(groups[a][0], groups[b][1])]
    del checked
    for lo, hi in groups:
        table = _read_ranges(paths[lo:hi])
        for path in paths[lo:hi]:
            os.unlink(path)
        if not table.num_rows:
            continue
        keys, order, _ = _range_keys(table, is_manifest)
        payload = table.select(PAYLOAD_SCHEMA.names).take(order)
        del table, order
        yield pa.table([keys, pa.array(keys_to_ids(keys)), payload.column("sources"), payload.column("caption"),
                        payload.column("meta"), payload.column("problem"), payload.column("warnings"),
                        reserved_column(keys)], schema=PLAN_SCHEMA.remove(0))


def _whole_units(tables, sps: int):
    """PLAN_SCHEMA tables of whole units (numbered from 0) from sorted rows in tables of any size."""
    carry, start = None, 0
    for table in tables:
        if carry is not None:
            table = pa.concat_tables([carry, table])
        whole = table.num_rows // sps * sps
        carry = table.slice(whole) if whole < table.num_rows else None
        if whole:
            yield _numbered(table.slice(0, whole), start, sps)
            start += whole
    if carry is not None:
        yield _numbered(carry, start, sps)


def _numbered(table: pa.Table, start: int, sps: int) -> pa.Table:
    unit = (np.arange(start, start + table.num_rows, dtype=np.int64) // sps).astype(np.int32)
    return table.combine_chunks().add_column(0, PLAN_SCHEMA.field(0), pa.array(unit))


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
            h.update(np.ascontiguousarray(col.to_numpy(), dtype="<i8").tobytes())
            continue
        if name == "reserved":
            h.update(pc.fill_null(pc.list_value_length(col), -1).to_numpy().astype("<i8").tobytes())
            col = col.flatten()
        _hash_strings(h, col)
    return h.hexdigest()[:32]


def _hash_strings(h, col: pa.Array) -> None:
    """Lengths (-1 for null) then bytes of a string array, whatever its offset in its buffers."""
    h.update(pc.fill_null(pc.binary_length(col), -1).to_numpy().astype("<i8").tobytes())
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
    units = table.column("unit").to_numpy()
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
            table = pf.read_row_group(index)
            if len(table) and pc.any(pc.not_equal(table.column("unit"), index)).as_py():
                raise RuntimeError(f"{out.url}/{PLAN_FILE}: row group {index} holds another unit")
            digest = digests[index]
        else:  # a plan written before units had row groups of their own
            table = pf.read()
            table = table.filter(pc.equal(table.column("unit"), index))
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
