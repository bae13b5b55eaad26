"""Sample keys and ids.

A key is tar-safe (``[A-Za-z0-9_-]``, no dots: webdataset splits member names at the first dot),
at most 128 characters, stable across runs and unique in the dataset. An id is a signed 64-bit
integer hashed from the key: the FAISS id of the sample. Row positions are never ids.
"""
from __future__ import annotations

import hashlib
import re

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
