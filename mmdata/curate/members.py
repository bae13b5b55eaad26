"""The members of chosen samples of an input shard, read from its tar without holding the tar:
one pass over the headers (the data is seeked over) finds where each wanted member lies, and a
sample's bytes are read when it is written."""
from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator

from mmdata.storage import OutputDir


def member_index(build: OutputDir, shard: str, keys: set[str]) -> dict[str, dict[str, tuple[int, int]]]:
    """``{key: {ext: (offset, size)}}`` of the members of ``keys`` in ``shards/<shard>.tar``, keys split
    as ``features.read_members`` splits them (first dot of the base name); KeyError for a key absent."""
    found: dict[str, dict[str, tuple[int, int]]] = {}
    with build.fs.open(build.path(f"shards/{shard}.tar"), "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
        while (info := tar.next()) is not None:
            tar.members.clear()  # tarfile keeps every header it saw: one shard's worth, dropped as we go
            if info.isfile():
                key, _, ext = info.name.rpartition("/")[2].partition(".")
                if key in keys:
                    found.setdefault(key, {})[ext] = (info.offset_data, info.size)
    missing = sorted(keys - set(found))
    if missing:
        raise KeyError(f"shards/{shard}.tar has no member of sample {missing[0]!r} ({len(missing)} missing)")
    return found


def stream_samples(build: OutputDir, wanted: Iterable[tuple[str, str]],
                   index: dict[str, dict[str, dict[str, tuple[int, int]]]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` of each ``(input shard, key)`` of ``wanted`` in that order, one sample in
    memory at a time; ``index``: ``member_index`` of each shard. A shard's file stays open while its
    samples follow one another."""
    fh, current = None, None
    try:
        for shard, key in wanted:
            if shard != current:
                if fh is not None:
                    fh.close()
                fh, current = build.fs.open(build.path(f"shards/{shard}.tar"), "rb"), shard
            sample = {}
            for ext, (offset, size) in sorted(index[shard][key].items(), key=lambda kv: kv[1][0]):
                fh.seek(offset)
                data = fh.read(size)
                if len(data) != size:
                    raise OSError(f"shards/{shard}.tar: {key}.{ext} is truncated ({len(data)} of {size} bytes)")
                sample[ext] = data
            yield key, sample
    finally:
        if fh is not None:
            fh.close()
