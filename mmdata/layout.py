"""The files of an mmdata output: where each one lives, and ``--overwrite``: delete only what mmdata wrote.

A folder is an mmdata output when it holds an mmdata ``manifest.json`` or ``plan.parquet``.
``--overwrite`` refuses any other non-empty folder, and in an mmdata output it removes only the
files that match the output layout below; anything else (a user's notes in ``index/``) stays.
"""
from __future__ import annotations

import json
import posixpath
import re

from mmdata.errors import UserError
from mmdata.storage import OutputDir

IDS_FILE = "index/ids.parquet"


def shard_files(name: str) -> dict[str, str]:
    """Unit ``name``'s shard files: the tar, its parquet table, its stats (the commit marker)."""
    return {"tar": f"shards/{name}.tar", "parquet": f"shards/{name}.parquet", "stats": f"shards/{name}_stats.json"}


def embedding_file(modality: str, name: str) -> str:
    """Unit ``name``'s ``modality`` embeddings (one row per written sample, in row order)."""
    return f"embeddings/{modality}/{name}.npy"


_N = r"\d{5,}"
_TMP = r"(\.tmp-[0-9a-zA-Z_-]+)?"
LAYOUT = re.compile(
    "^(?:" + "|".join([
        r"manifest\.json", r"plan\.parquet",
        rf"shards/{_N}\.(?:tar|parquet)", rf"shards/{_N}_(?:stats|offsets)\.json", r"shards/sizes\.json",
        r"report\.html",
        rf"embeddings/[A-Za-z0-9_]+/{_N}\.npy",
        r"index/ids\.parquet", r"index/index_infos\.json", r"index/[A-Za-z0-9_]+\.index",
        rf"index/parts/[A-Za-z0-9_]+/(?:trained|{_N})\.index",
        rf"\.mmdata-tasks-[A-Za-z0-9_-]+/{_N}\.json", r"\.mmdata-probe-[0-9a-f]+",
        r"\.mmdata-embed/[0-9a-f]{16}/.+",  # the staging of an interrupted `mmdata embed`
    ]) + ")" + _TMP + "$"
)
# folders of the layout, deepest first: removed when the files above leave them empty
FOLDERS = (r"index/parts/[A-Za-z0-9_]+", r"index/parts", r"index", r"embeddings/[A-Za-z0-9_]+", r"embeddings",
           r"shards", r"\.mmdata-tasks-[A-Za-z0-9_-]+", r"\.mmdata-embed/.+", r"\.mmdata-embed")


def offsets_file(name: str) -> str:
    """The offsets index of shard ``name`` (``00000``): member → (offset, size) in its tar."""
    return f"shards/{name}_offsets.json"


def is_layout_file(rel: str) -> bool:
    return LAYOUT.match(rel) is not None


def _files(out: OutputDir) -> list[str]:
    if not out.fs.exists(out.root):
        return []
    prefix = out.root.rstrip("/") + "/"
    return sorted(p[len(prefix):] for p in out.fs.find(out.root) if p.startswith(prefix))


def is_mmdata_output(out: OutputDir) -> bool:
    """True when the folder holds a manifest.json written by mmdata or a plan.parquet."""
    if out.exists("plan.parquet"):
        return True
    if out.exists("manifest.json"):
        try:
            return "mmdata_version" in json.loads(out.read_bytes("manifest.json"))
        except (OSError, ValueError, TypeError):
            return False
    return False


def clear_output(out: OutputDir) -> int:
    """Remove the mmdata files of ``out`` for ``--overwrite``; returns how many. A UserError, touching
    nothing, when ``out`` is a non-empty folder that is not an mmdata output."""
    files = _files(out)
    if not files:
        return 0
    if not is_mmdata_output(out):
        raise UserError(f"--overwrite: {out.url} is not empty and is not an mmdata output (no mmdata manifest.json "
                        f"or plan.parquet); refusing to delete its files, choose another --out")
    mine = [rel for rel in files if is_layout_file(rel)]
    for rel in mine:
        out.fs.rm_file(out.path(rel))
    left = {posixpath.dirname(rel) for rel in files if rel not in set(mine)}
    for pattern in FOLDERS:
        for folder in sorted({d for d in _dirs(out) if re.fullmatch(pattern, d)}, reverse=True):
            if not any(f == folder or f.startswith(folder + "/") for f in left):
                try:
                    out.fs.rmdir(out.path(folder))
                except OSError:
                    pass
    return len(mine)


def _dirs(out: OutputDir) -> set[str]:
    prefix = out.root.rstrip("/") + "/"
    found = out.fs.find(out.root, withdirs=True, detail=True)
    return {p[len(prefix):] for p, info in found.items() if info.get("type") == "directory" and p.startswith(prefix)}
