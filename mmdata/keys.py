"""Sample keys and ids.

A key is tar-safe (``[A-Za-z0-9_-]``, no dots: webdataset splits member names at the first dot),
at most 128 characters, stable across runs and unique in the dataset. An id is a signed 64-bit
integer hashed from the key: the FAISS id of the sample. Row positions are never ids.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

MAX_KEY_LEN = 128
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _digest(text: str, n: int) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()[:n]


def sanitize_key(raw: str) -> str:
    """Map a source-derived name (a relative stem, a manifest value) to a tar-safe key.

    Unsafe runs become ``_``; an over-long or empty result gets a hash suffix of the raw name, so
    distinct raw names rarely meet and equal ones always map alike.
    """
    key = _UNSAFE.sub("_", raw).strip("_") or "k"
    if len(key) > MAX_KEY_LEN:
        key = key[: MAX_KEY_LEN - 17].rstrip("_") + "_" + _digest(raw, 16)
    return key


def unique_keys(raws: list[str]) -> list[str]:
    """Sanitised keys for ``raws`` (in the same order), collisions resolved deterministically.

    Raw names are considered in sorted order: the first to claim a key keeps it; later ones get a
    suffix hashed from their raw name (and a counter in the astronomically rare case that collides
    too). The result depends only on the set of raw names, not on their listing order.
    """
    taken: dict[str, str] = {}
    out: dict[str, str] = {}
    for raw in sorted(set(raws)):
        key = sanitize_key(raw)
        if key in taken:
            base = key[: MAX_KEY_LEN - 9].rstrip("_")
            key = f"{base}_{_digest(raw, 8)}"
            n = 1
            while key in taken:
                key = f"{base[: MAX_KEY_LEN - 12]}_{_digest(raw, 8)}{n:03d}"[:MAX_KEY_LEN]
                n += 1
        taken[key] = raw
        out[raw] = key
    return [out[r] for r in raws]


def key_to_id(key: str) -> int:
    """Stable signed 64-bit id of a key (blake2b). Never -1, which FAISS reserves for 'no result'."""
    value = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little", signed=True)
    return -2 if value == -1 else value


# Vectorised forms of the functions above, for plans of any size: the same results, computed on Arrow
# arrays (pyarrow.compute), with Python only for the rare rows that need it (over-long keys, collisions).

_SAFE = None


def _replace_unsafe_runs(raws):
    """``_UNSAFE.sub("_", raw)`` of every value, on the bytes: a run of unsafe characters is a run of
    unsafe bytes in UTF-8 (every byte of a non-ASCII character is unsafe), and becomes one ``_``."""
    import pyarrow as pa

    global _SAFE
    if _SAFE is None:
        _SAFE = np.zeros(256, dtype=bool)
        for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-":
            _SAFE[c] = True
    raws = raws.cast(pa.string()).fill_null("")  # raw names are never null
    n = len(raws)
    step = 1 << 16
    if n > step:  # in slices: the byte masks stay small
        return pa.concat_arrays([_replace_unsafe_runs(raws.slice(i, step)) for i in range(0, n, step)])
    if n == 0:
        return raws
    offsets = np.frombuffer(raws.buffers()[1], dtype=np.int32)[raws.offset: raws.offset + n + 1].astype(np.int64)
    data = np.frombuffer(raws.buffers()[2], dtype=np.uint8) if raws.buffers()[2] is not None else np.zeros(0, np.uint8)
    data = data[offsets[0]:offsets[-1]]
    offsets = offsets - offsets[0]
    safe = _SAFE[data]
    first = np.zeros(len(data), dtype=bool)
    starts = offsets[:-1][offsets[:-1] < offsets[1:]]
    first[starts] = True
    keep = safe.copy()
    keep[1:] |= ~safe[1:] & safe[:-1]  # the first byte of an unsafe run
    keep |= ~safe & first
    out = np.where(safe, data, np.uint8(ord("_")))[keep]
    kept = np.concatenate([[0], np.cumsum(keep, dtype=np.int32)])
    new_offsets = kept[offsets].astype(np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(new_offsets.tobytes()), pa.py_buffer(out.tobytes()))


def sanitize_keys(raws):
    """``sanitize_key`` of every value of the Arrow string array ``raws``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keys = pc.utf8_trim(_replace_unsafe_runs(raws), characters="_")
    # typed scalars: inferring a Python value's type makes pyarrow import pandas (see skip_pandas_probe)
    keys = pc.if_else(pc.equal(keys, pa.scalar("", pa.string())), pa.scalar("k", pa.string()), keys)
    long = pc.greater(pc.binary_length(keys), pa.scalar(MAX_KEY_LEN, pa.int32()))
    if pc.any(long).as_py():
        fixed = [sanitize_key(r) for r in raws.filter(long).to_pylist()]
        keys = pc.replace_with_mask(keys, long, pa.array(fixed, pa.string()))
    return keys


def unique_keys_arrow(raws):
    """``unique_keys`` of the Arrow string array ``raws`` (one key per value, same order): each
    distinct raw name is sanitised; where two distinct raw names meet, the first in sorted order keeps
    the key and the others get the same hashed suffix as ``unique_keys`` gives them."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from mmdata.arrow import numpy_values

    raws = raws.combine_chunks() if isinstance(raws, pa.ChunkedArray) else raws
    keys = sanitize_keys(raws)
    n = len(raws)
    if n < 2 or pc.count_distinct(keys).as_py() == pc.count_distinct(raws).as_py():
        return keys  # no two distinct raw names share a key
    order = pc.sort_indices(pa.table({"k": keys, "r": raws}), sort_keys=[("k", "ascending"), ("r", "ascending")])
    sk, sr = keys.take(order), raws.take(order)
    same_key = np.zeros(n, dtype=bool)
    same_key[1:] = numpy_values(pc.equal(sk.slice(1), sk.slice(0, n - 1)))
    same_raw = np.zeros(n, dtype=bool)
    same_raw[1:] = numpy_values(pc.equal(sr.slice(1), sr.slice(0, n - 1)))
    # a row whose raw differs from the previous row's, under the same key, starts a colliding raw name;
    # every later row of the key group with a raw name of its own collides too
    starts = same_key & ~same_raw
    if not starts.any():
        return keys
    changed = np.maximum.accumulate(np.where(starts, np.arange(n), -1))  # the last raw change so far
    group_start = np.maximum.accumulate(np.where(~same_key, np.arange(n), 0))
    rows = np.sort(numpy_values(order)[changed >= group_start])  # rows after the first raw name of their key
    colliding = raws.take(pa.array(rows)).to_pylist()
    suffixed = {raw: f"{sanitize_key(raw)[: MAX_KEY_LEN - 9].rstrip('_')}_{_digest(raw, 8)}" for raw in set(colliding)}
    new = pa.array(list(suffixed.values()), pa.string())
    if len(set(suffixed.values())) < len(suffixed) or pc.any(pc.is_in(new, value_set=keys)).as_py():
        # a suffixed key meets another key: the exact, sequential rule decides (astronomically rare)
        return pa.array(unique_keys(raws.to_pylist()), pa.string())
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return pc.replace_with_mask(keys, pa.array(mask), pa.array([suffixed[r] for r in colliding], pa.string()))


def keys_to_ids(keys) -> np.ndarray:
    """``key_to_id`` of every key of the Arrow string array ``keys``, as int64."""

    out = np.empty(len(keys), dtype=np.int64)
    step = 1 << 16
    for start in range(0, len(keys), step):
        chunk = keys.slice(start, step).to_pylist()
        digests = b"".join([hashlib.blake2b(k.encode("utf-8"), digest_size=8).digest() for k in chunk])
        out[start:start + len(chunk)] = np.frombuffer(digests, dtype="<i8")
    out[out == -1] = -2
    return out
