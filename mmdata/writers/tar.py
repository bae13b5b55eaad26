"""WebDataset tar writing: reproducible bytes (fixed mtime, owner and mode), sorted members per sample."""
from __future__ import annotations

import io
import tarfile
from typing import BinaryIO, Iterable, Optional

FIXED_MTIME = 946684800  # 2000-01-01T00:00:00Z: any constant works, a plausible date keeps tools quiet


def write_tar(fileobj: BinaryIO, samples: Iterable[tuple[str, dict[str, bytes]]],
              offsets: Optional[list[tuple[str, int, int]]] = None) -> int:
    """Write ``(key, {ext: bytes})`` samples in the given order; members of a sample sorted by name.

    Returns the number of samples written. ``ext`` has no leading dot (``jpg``, ``tokens.npy``).
    ``offsets``, when given, receives ``(member name, offset of its data, size)`` for the offsets index.
    """
    n = 0
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members):
                data = members[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = FIXED_MTIME
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
                if offsets is not None:  # the data ends at tar.offset, padded to whole blocks
                    blocks = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    offsets.append((info.name, tar.offset - blocks, len(data)))
            n += 1
    return n


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
