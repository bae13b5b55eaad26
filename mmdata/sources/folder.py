"""A folder source: files grouped into records by relative stem (``a/cat.jpg`` + ``a/cat.txt``)."""
from __future__ import annotations

import posixpath
from collections import defaultdict

import fsspec
from fsspec.implementations.local import LocalFileSystem

from mmdata.records import modality_of


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _open_root(url: str, exclude: str | None):
    """``(fs, root, local, excluded prefix or None)`` of the folder ``url``: what both listings start from."""
    fs, root = fsspec.core.url_to_fs(url)
    excl = None
    if exclude:
        _, excl = fsspec.core.url_to_fs(exclude)
        excl = excl.rstrip("/") + "/"
    return fs, root.rstrip("/"), isinstance(fs, LocalFileSystem), excl


def list_folder(url: str, exclude: str | None = None) -> list[tuple[str, dict, list[str], str | None]]:
    """Group the files under ``url`` into ``(stem, sources, warnings, problem)`` tuples, sorted by stem.

    Hidden files and folders (a leading dot) are skipped, as is ``exclude`` (the build's own output
    when it lies inside the input). A stem with two files of one modality (``cat.jpg`` and
    ``cat.png``) gets the problem ``ambiguous:<modality>``; one made only of unsupported files gets
    ``unsupported:<ext>``; unsupported files beside supported ones are recorded as warnings.
    """
    fs, root, local, excl = _open_root(url, exclude)
    groups: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(fs.find(root, detail=False)):
        rel = path[len(root) + 1:] if path.startswith(root + "/") else posixpath.basename(path)
        if _is_hidden(rel) or (excl and (path + "/").startswith(excl)):
            continue
        stem, ext = posixpath.splitext(rel)
        ext = ext[1:].lower()
        full = path if local else fs.unstrip_protocol(path)
        groups[stem][modality_of(ext) or f"other:{ext or 'none'}"].append(full)
    return list(_group(groups))


def _group(stem_files: dict[str, dict[str, list[str]]]):
    """``list_folder``'s rule for one stem's files: ``(sources, warnings, problem)``."""
    for stem in sorted(stem_files):
        slots = stem_files[stem]
        sources, warnings, problem = {}, [], None
        for slot, files in sorted(slots.items()):
            if slot.startswith("other:"):
                warnings.extend(f"ignored:{posixpath.basename(f)}" for f in files)
                continue
            if len(files) > 1:
                problem = problem or f"ambiguous:{slot}"
                warnings.extend(f"ambiguous:{posixpath.basename(f)}" for f in files)
            sources[slot] = files[0]
        if not sources:
            problem = "unsupported:" + ",".join(sorted(s.split(":", 1)[1] for s in slots))
            warnings = []
        yield stem, sources, warnings, problem


def walk_folder(url: str, exclude: str | None = None, batch_rows: int = 1 << 16):
    """``list_folder``'s groups, listed streaming: one folder at a time (``fs.walk``, hidden folders and
    ``exclude`` pruned), yielded as Arrow tables of ``raw_key, sources, caption, meta, problem,
    warnings`` (``sources`` as JSON text) in listing order, not sorted. A stem's files always share one
    folder, so each folder is grouped on its own."""
    import json

    import pyarrow as pa

    fs, root, local, excl = _open_root(url, exclude)
    cols: dict[str, list] = {"raw_key": [], "sources": [], "problem": [], "warnings": []}

    def table():
        n = len(cols["raw_key"])
        t = pa.table({"raw_key": pa.array(cols["raw_key"], pa.string()),
                      "sources": pa.array(cols["sources"], pa.string()),
                      "caption": pa.nulls(n, pa.string()), "meta": pa.array(["{}"] * n, pa.string()),
                      "problem": pa.array(cols["problem"], pa.string()),
                      "warnings": pa.array(cols["warnings"], pa.list_(pa.string()))})
        for v in cols.values():
            v.clear()
        return t

    for folder, dirs, files in fs.walk(root, detail=False, topdown=True):
        folder = folder.rstrip("/")
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (excl and (f"{folder}/{d}/").startswith(excl))]
        groups: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for name in sorted(files):
            path = f"{folder}/{name}" if name else folder
            rel = path[len(root) + 1:] if path.startswith(root + "/") else posixpath.basename(path)
            if _is_hidden(rel) or (excl and (path + "/").startswith(excl)):
                continue
            stem, ext = posixpath.splitext(rel)
            ext = ext[1:].lower()
            full = path if local else fs.unstrip_protocol(path)
            groups[stem][modality_of(ext) or f"other:{ext or 'none'}"].append(full)
        for stem, sources, warnings, problem in _group(groups):
            cols["raw_key"].append(stem)
            cols["sources"].append(json.dumps(sources, sort_keys=True))
            cols["problem"].append(problem)
            cols["warnings"].append(warnings)
        if len(cols["raw_key"]) >= batch_rows:
            yield table()
    if cols["raw_key"]:
        yield table()
