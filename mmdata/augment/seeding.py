"""Where augmentation randomness comes from: ``hash(seed, key, view)``, nothing else.

Every op of every modality gets its own generator, seeded by blake2b of ``(seed, key, view,
modality, op position)``. So the same config gives the same draws on any engine, worker count or
run; an op's draws do not shift when another op's probability changes; and nothing reads (or
advances) Python's, NumPy's or torch's global random state.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

_DOMAIN = "mmdata.augment/1"  # bump when the derivation changes: old seeds then give other draws


def sample_seed(seed: int, key: str, view: int, stream: str = "") -> int:
    """A 64-bit seed from blake2b over ``(seed, key, view, stream)`` (never Python's salted ``hash``)."""
    payload = json.dumps([_DOMAIN, int(seed), str(key), int(view), str(stream)], separators=(",", ":"))
    return int.from_bytes(hashlib.blake2b(payload.encode("utf-8"), digest_size=8).digest(), "little")


def op_rng(seed: int, key: str, view: int, modality: str, index: int) -> np.random.Generator:
    """The generator of op number ``index`` in the ``modality`` list, for one (seed, key, view)."""
    return np.random.default_rng(sample_seed(seed, key, view, f"{modality}/{index}"))
