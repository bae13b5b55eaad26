"""Offsets index of a shard's members, like webdataset's wids: member name → (offset, size) of its
bytes in the tar. Written beside each shard at build time (``shards/00000_offsets.json``) so one
member is read with one ranged read and no tar is scanned per request.

Outputs built before the index existed still work: :class:`ShardReader` then reads the tar's
headers once (seeking over the data) and keeps the same table in memory.
"""
from __future__ import annotations

import json
import tarfile
from typing import BinaryIO

from mmdata.layout import offsets_file
from mmdata.storage import OutputDir

FORMAT = "mmdata-offsets/1"


def offsets_bytes(members: list[tuple[str, int, int]], tar_bytes: int) -> bytes:
    """The offsets file of a tar: ``members`` are ``(name, offset of the data, size)`` in tar order."""
    doc = {"format": FORMAT, "tar_bytes": tar_bytes, "members": [list(m) for m in members]}
    return json.dumps(doc, separators=(",", ":")).encode()


def scan_offsets(fileobj: BinaryIO) -> list[tuple[str, int, int]]:
    """``(name, offset, size)`` of every regular member, read from the tar headers (data skipped)."""
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


def split_member(name: str) -> tuple[str, str]:
    """``("key", "ext")`` of a member name, split at the first dot of its base name (webdataset's rule)."""
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return name[: len(name) - len(base)] + key, ext


class ShardReader:
    """Random access to the members of one shard: ``ShardReader(out, "00000.tar").read("cat", "jpg")``."""

    def __init__(self, out: OutputDir, shard: str):
        self.out = out
        self.shard = shard
        self.name = shard.removesuffix(".tar")
        self.tar_path = out.path(f"shards/{self.name}.tar")
        self.indexed = out.exists(offsets_file(self.name))
        if self.indexed:
            doc = json.loads(out.read_bytes(offsets_file(self.name)))
            if doc.get("format") != FORMAT:
                raise ValueError(f"{offsets_file(self.name)}: unknown format {doc.get('format')!r}")
            members = [tuple(m) for m in doc["members"]]
        else:
            with out.fs.open(self.tar_path, "rb") as fh:
                members = scan_offsets(fh)
        self._samples: dict[str, dict[str, tuple[int, int]]] = {}
        for name, offset, size in members:
            key, ext = split_member(name)
            self._samples.setdefault(key, {})[ext] = (int(offset), int(size))

    def keys(self) -> list[str]:
        """The sample keys, in tar order."""
        return list(self._samples)

    def members(self, key: str) -> dict[str, tuple[int, int]]:
        """``{ext: (offset, size)}`` of a sample; KeyError when the shard has no such key."""
        return self._samples[key]

    def __contains__(self, key: str) -> bool:
        return key in self._samples

    def read(self, key: str, ext: str, max_bytes: int | None = None) -> bytes:
        """The bytes of member ``{key}.{ext}`` (KeyError when absent; ValueError above ``max_bytes``)."""
        offset, size = self._samples[key][ext]
        if max_bytes is not None and size > max_bytes:
            raise ValueError(f"{key}.{ext} has {size} bytes, more than {max_bytes}")
        with self.out.fs.open(self.tar_path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
        if len(data) != size:
            raise ValueError(f"{self.shard}: {key}.{ext} is truncated ({len(data)} of {size} bytes)")
        return data

    def read_sample(self, key: str, exts: list[str] | None = None) -> dict[str, bytes]:
        """``{ext: bytes}`` of a sample's members (all, or those of ``exts`` it has), one file open."""
        wanted = {e: v for e, v in self._samples[key].items() if exts is None or e in exts}
        out: dict[str, bytes] = {}
        with self.out.fs.open(self.tar_path, "rb") as fh:
            for ext, (offset, size) in sorted(wanted.items(), key=lambda kv: kv[1][0]):
                fh.seek(offset)
                out[ext] = fh.read(size)
        return out
