"""One fsspec I/O layer: reading sources and committing outputs atomically.

Local outputs are written to a temporary name in the same folder, fsynced and renamed, so a killed
run never leaves a half-written file under its final name. A group of files (a unit's shard and
tables) is renamed together after each is fsynced, with one fsync of each folder for the group. Object stores commit a whole object on
upload, so remote outputs are staged in a local temporary file and uploaded in one put.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
import uuid
from typing import BinaryIO, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from mmdata.errors import UserError


class TooLarge(ValueError):
    """A source file bigger than ``max_size`` (found on its size, before reading it)."""

    def __init__(self, url: str, size: int, limit: int):
        super().__init__(f"{url}: {size} bytes, over the limit of {limit} (--max-source-bytes)")
        self.size, self.limit = size, limit


def read_bytes(url: str, limit: int | None = None, max_size: int | None = None) -> bytes:
    """Read a whole source file (local path or fsspec URL), or at most ``limit + 1`` bytes of it (a
    caller that gets more than ``limit`` knows the file is too large without holding all of it).
    ``max_size``: ``TooLarge`` when the file's size (stat) is over it, before reading a byte (and
    if a file of unknown size turns out bigger). Raises OSError subclasses on failure."""
    caps = [c for c in (limit, max_size) if c is not None]
    size = min(caps) + 1 if caps else -1
    if "://" not in url:
        with open(url, "rb") as fh:
            _check_size(url, os.fstat(fh.fileno()).st_size, max_size)
            return _checked(url, fh.read(size), max_size)
    with fsspec.open(url, "rb") as fh:
        _check_size(url, getattr(fh, "size", None), max_size)
        return _checked(url, fh.read(size), max_size)


def _check_size(url: str, size: int | None, max_size: int | None) -> None:
    if max_size is not None and size is not None and size > max_size:
        raise TooLarge(url, size, max_size)


def _checked(url: str, data: bytes, max_size: int | None) -> bytes:
    if max_size is not None and len(data) > max_size:  # a size the filesystem did not know, or a file that grew
        raise TooLarge(url, len(data), max_size)
    return data


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` survive a crash (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OutputDir:
    """The output folder of a build, on any fsspec filesystem."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def ensure_writable(self) -> None:
        """Create the folder and prove we can write there; a clear UserError otherwise."""
        probe = self.path(f".mmdata-probe-{uuid.uuid4().hex}")
        try:
            self.fs.makedirs(self.path("shards"), exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except (OSError, PermissionError) as exc:
            raise UserError(f"output {self.url} is not writable: {getattr(exc, 'strerror', None) or exc}") from None

    def makedirs(self, rel: str) -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)

    def local_path(self, rel: str) -> str:
        """A local file holding ``rel``: the file itself on a local output, else a temporary copy
        (for libraries that read only local paths, such as faiss's ``read_index``)."""
        if self.local:
            return self.path(rel)
        import tempfile

        fd, path = tempfile.mkstemp(suffix=posixpath.splitext(rel)[1])
        os.close(fd)
        self.fs.get_file(self.path(rel), path)
        return path

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def glob(self, pattern: str) -> list[str]:
        """Relative paths matching ``pattern`` (relative to the root), sorted."""
        found = self.fs.glob(self.path(pattern))
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix):] if p.startswith(prefix) else p for p in found)

    def remove(self, rel: str) -> None:
        if self.fs.exists(self.path(rel)):
            self.fs.rm(self.path(rel), recursive=True)

    @contextlib.contextmanager
    def atomic_open(self, rel: str, sync_folder: bool = True) -> Iterator[BinaryIO]:
        """A binary file that appears under ``rel`` only if the block completes. ``sync_folder=False``
        leaves the folder's fsync (which makes the rename itself survive a crash) to the caller."""
        final = self.path(rel)
        folder = posixpath.dirname(final)
        if self.local:
            os.makedirs(folder, exist_ok=True)
            tmp = f"{final}.tmp-{uuid.uuid4().hex[:12]}"
            try:
                with open(tmp, "wb") as fh:
                    yield fh
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, final)
                if sync_folder:
                    fsync_dir(folder)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return
        with tempfile.NamedTemporaryFile(suffix=".mmdata") as fh:
            yield fh
            fh.flush()
            self.fs.makedirs(folder, exist_ok=True)
            self.fs.put_file(fh.name, final)

    def write_bytes(self, rel: str, data: bytes, sync_folder: bool = True) -> None:
        with self.atomic_open(rel, sync_folder) as fh:
            fh.write(data)

    @contextlib.contextmanager
    def atomic_group(self) -> Iterator["FileGroup"]:
        """Files that appear under their names together, when the block completes: each is written
        to a temporary name and fsynced, then all are renamed and each folder is fsynced once (not
        once per file). A killed block leaves only temporaries (``clean_temporaries``)."""
        group = FileGroup(self)
        try:
            yield group
            group.commit()
        finally:
            group.discard()

    def clean_temporaries(self) -> int:
        """Remove temporary files left by killed runs; returns how many."""
        stale = self.glob("**/*.tmp-*") if self.local else []
        for rel in stale:
            self.remove(rel)
        return len(stale)


class FileGroup:
    """The files of one ``OutputDir.atomic_group`` block (remote outputs: one put per file, as usual)."""

    def __init__(self, out: OutputDir):
        self.out = out
        self.pending: list[tuple[str, str]] = []  # (temporary, final) local paths, in write order

    @contextlib.contextmanager
    def open(self, rel: str) -> Iterator[BinaryIO]:
        if not self.out.local:
            with self.out.atomic_open(rel) as fh:
                yield fh
            return
        final = self.out.path(rel)
        os.makedirs(posixpath.dirname(final), exist_ok=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:12]}"
        self.pending.append((tmp, final))
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open(rel) as fh:
            fh.write(data)

    def commit(self) -> None:
        folders = []
        for tmp, final in self.pending:
            os.replace(tmp, final)
            if posixpath.dirname(final) not in folders:
                folders.append(posixpath.dirname(final))
        self.pending = []
        for folder in folders:
            fsync_dir(folder)

    def discard(self) -> None:
        for tmp, _ in self.pending:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.pending = []
