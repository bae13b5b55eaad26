"""inspect: list the samples of one shard and their members."""
from __future__ import annotations

import fsspec

from mmdata.writers.tar import read_tar_samples


def describe_shard(url: str) -> list[dict]:
    """One entry per sample: key and ``{ext: size in bytes}``."""
    with fsspec.open(url, "rb") as fh:
        samples = read_tar_samples(fh)
    return [{"key": key, "members": {ext: len(data) for ext, data in members.items()}} for key, members in samples]
