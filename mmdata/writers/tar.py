"""WebDataset tar writing: reproducible bytes (fixed mtime, owner and mode), sorted members per sample."""
from __future__ import annotations

import struct
import tarfile
from typing import BinaryIO, Iterable, Optional

FIXED_MTIME = 946684800  # 2000-01-01T00:00:00Z: any constant works, a plausible date keeps tools quiet


def write_tar(fileobj: BinaryIO, samples: Iterable[tuple[str, dict[str, bytes]]],
              offsets: Optional[list[tuple[str, int, int]]] = None) -> int:
    """Write ``(key, {ext: bytes})`` samples in the given order; members of a sample sorted by name.

    Returns the number of samples written. ``ext`` has no leading dot (``jpg``, ``tokens.npy``).
    ``offsets``, when given, receives ``(member name, offset of its data, size)`` for the offsets index.
    """
    n, offset = 0, fileobj.tell()
    for key, members in samples:
        for ext in sorted(members):
            data, name = members[ext], f"{key}.{ext}"
            head = member_header(name, len(data))
            fileobj.write(head)
            fileobj.write(data)
            pad = -len(data) % tarfile.BLOCKSIZE
            if pad:
                fileobj.write(tarfile.NUL * pad)
            if offsets is not None:
                offsets.append((name, offset + len(head), len(data)))
            offset += len(head) + len(data) + pad
        n += 1
    end = 2 * tarfile.BLOCKSIZE  # the end-of-archive blocks, then zeros to a whole record, as tarfile closes
    fileobj.write(tarfile.NUL * (end + -(offset + end) % tarfile.RECORDSIZE))
    return n


# The 512-byte ustar header of a regular file, as tarfile writes it for the PAX format when no pax
# record is needed (tests/test_offsets.py compares the bytes): tarfile's own code spends ~0.15 ms a
# member on the checks and fields, ~0.5 ms a sample; shards are written with ours.
_HEAD = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")
_MODE_IDS = (b"%07o\0" % 0o644, b"%07o\0" % 0, b"%07o\0" % 0)
_MTIME = b"%011o\0" % FIXED_MTIME


def member_header(name: str, size: int) -> bytes:
    """The tar header of member ``name`` holding ``size`` bytes (fixed mtime, owner and mode):
    computed here for an ASCII name of at most 100 characters and a size under 8 GiB, else by tarfile
    (a pax record first: long or non-ASCII names, huge sizes)."""
    if len(name) <= 100 and name.isascii() and size < 8 ** 11:
        fields = [name.encode("ascii"), *_MODE_IDS, b"%011o\0" % size, _MTIME, b" " * 8, tarfile.REGTYPE, b"",
                  tarfile.POSIX_MAGIC, b"", b"", b"", b"", b""]
        head = _HEAD.pack(*fields)
        return head[:148] + b"%06o\0" % sum(head) + head[155:]
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, FIXED_MTIME, 0o644, 0, 0, "", ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def read_tar_samples(fileobj: BinaryIO) -> list[tuple[str, dict[str, bytes]]]:
    """The samples of a tar as ``(key, {ext: bytes})`` in file order, read by webdataset's own tar
    iterator and grouping (split at the first dot of the member's base name), so verify, inspect and
    reembed see a shard exactly as the loader and training jobs do."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    samples: list[tuple[str, dict[str, bytes]]] = []
    members = ({**member, "__url__": "shard"} for member in tar_file_iterator(fileobj))
    for sample in group_by_keys(members):
        samples.append((sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")}))
    return samples
