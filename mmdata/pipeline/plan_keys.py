"""The plan's key rules: which records a key could be derived from (views, segments), the sorted keys
of a listing with repeats told apart, and the keys each record reserves for its derived samples."""
from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import ipc

from mmdata.arrow import numpy_values
from mmdata.keys import unique_keys_arrow
from mmdata.records import Record

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
    rows = (n - 1) - numpy_values(where.filter(found)).astype(np.int64)
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
    same[1:] = numpy_values(pc.equal(s.slice(1), s.slice(0, n - 1)))
    if not same.any():
        return raws
    starts = np.maximum.accumulate(np.where(~same, np.arange(n), 0))
    occurrence = np.empty(n, dtype=np.int64)
    occurrence[numpy_values(order)] = np.arange(n) - starts
    repeat = occurrence > 0
    suffix = pa.array(occurrence, mask=~repeat).cast(pa.string())
    return pc.if_else(pa.array(repeat), pc.binary_join_element_wise(raws, suffix, pa.scalar("#", pa.string())), raws)
