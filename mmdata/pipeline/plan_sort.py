"""The plan's external sort: records routed to key ranges on disk and planned one range at a time, so
the driver's memory does not grow with the number of records (``plan.planned_units`` uses it above
``plan.IN_MEMORY_ROWS`` records)."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import ipc

from mmdata.arrow import numpy_values
from mmdata.keys import keys_to_ids, sanitize_keys, unique_keys_arrow
from mmdata.pipeline.plan_keys import _DERIVED, _dedupe_arrow, _parents, reserved_column
from mmdata.schema import PLAN_SCHEMA

PAYLOAD_SCHEMA = pa.schema([PLAN_SCHEMA.field(name) for name in ("sources", "caption", "meta", "problem", "warnings")])

#
# Each record is routed by its *routing key* v: its sanitised raw name (the first ROUTE_PREFIX characters, right-
# stripped of ``_``, when longer; for a manifest row whose name sanitises to nothing, the key its repeat number
# gives it, ``k``, ``1``, ``2``...). Every key the plan can give a record, and every name it is compared with
# (``_dedupe``'s repeats ``v_1``, ``unique_keys``' hashed suffixes, a view's or segment's parent), is ``>= v`` and
# starts with v, so a record never lands before its range. Ranges are cut at splitters chosen from the sample;
# a range is planned in memory exactly as the whole plan would be, then checked: if a key or sanitised name in it
# reaches the next range's first splitter, or a derived key in it has its parent in an earlier range, the ranges
# concerned are merged and planned again. The result is therefore the in-memory plan, byte for byte.

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
    long = pc.greater(pc.binary_length(keys), pa.scalar(ROUTE_PREFIX, pa.int32()))  # typed: no pandas import
    if not pc.any(long).as_py():
        return keys
    cut = pc.utf8_rtrim(pc.utf8_slice_codeunits(keys, 0, ROUTE_PREFIX), characters="_")
    return pc.if_else(long, cut, keys)


def _range_of(values: pa.Array, splitters: pa.Array) -> np.ndarray:
    """For each value, how many splitters are ``<=`` it: its range (one Arrow sort, no Python per value)."""
    m = len(splitters)
    if not m:
        return np.zeros(len(values), dtype=np.int32)
    order = numpy_values(pc.sort_indices(pa.concat_arrays([splitters, values])))  # stable: a splitter before its equal
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
                    empty = pc.and_(pc.equal(keys, pa.scalar("k", pa.string())), pc.invert(pc.match_substring(raw, "k")))
                    if pc.any(empty).as_py():
                        fixed = numpy_values(empty)
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
