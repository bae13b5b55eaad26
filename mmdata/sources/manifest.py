"""A manifest source: a parquet/csv/tsv/jsonl table with one row per record.

Columns are mapped by name (``image_col``, ``text_col``, ``key_col``); every other column is kept
as metadata. Relative paths are resolved against the manifest's folder; URLs pass through.
"""
from __future__ import annotations

import io
import json
import math
import posixpath

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from mmdata.errors import UserError

MANIFEST_EXTS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def manifest_format(url: str) -> str | None:
    """The manifest format of ``url`` from its extension, or None for a folder / other file."""
    return MANIFEST_EXTS.get(posixpath.splitext(url.split("?")[0])[1].lower())


def _read_table(url: str, fmt: str) -> pa.Table:
    with fsspec.open(url, "rb") as fh:
        data = fh.read()
    try:
        if fmt == "parquet":
            return pq.read_table(io.BytesIO(data))
        if fmt in ("csv", "tsv"):
            return pacsv.read_csv(
                io.BytesIO(data),
                parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(strings_can_be_null=True),
            )
        try:
            return pajson.read_json(io.BytesIO(data))
        except pa.ArrowInvalid:
            return _read_jsonl_loose(data)
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        raise UserError(f"cannot read manifest {url} as {fmt}: {str(exc).splitlines()[0]}") from None


def _read_jsonl_loose(data: bytes) -> pa.Table:
    """JSONL that Arrow rejects (a column whose type changes between rows, NaN tokens): parsed row by
    row; a column holding more than one type keeps its values as text, so one odd row cannot stop a build."""
    rows = [json.loads(line) for line in data.decode("utf-8-sig").splitlines() if line.strip()]
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError("a line is not a JSON object")
    for r in rows:  # NaN / Infinity tokens are no value
        r.update({k: None for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)})
    cols: dict[str, set] = {}
    for r in rows:
        for k, v in r.items():
            if v is not None:
                cols.setdefault(k, set()).add(type(v))
    mixed = {k for k, types in cols.items() if len(types) > 1 or types & {dict, list}}
    for r in rows:
        for k in mixed & r.keys():
            v = r[k]
            r[k] = v if v is None or isinstance(v, str) else json.dumps(v)
    return pa.Table.from_pylist(rows)


def _resolver(url: str):
    fs, path = fsspec.core.url_to_fs(url)
    base = posixpath.dirname(path)
    local = isinstance(fs, LocalFileSystem)

    def resolve(value: str) -> str:
        if "://" in value:
            return value
        full = value if value.startswith("/") else posixpath.normpath(posixpath.join(base, value))
        return full if local else fs.unstrip_protocol(full)

    return resolve, base


def read_manifest(url: str, image_col: str, text_col: str, key_col: str | None):
    """Rows of the manifest as ``(raw_key, sources, caption, meta)``, in manifest order."""
    fmt = manifest_format(url)
    table = _read_table(url, fmt)
    cols = table.column_names
    if key_col and key_col not in cols:
        raise UserError(f"manifest {url} has no key column {key_col!r} (columns: {', '.join(cols)})")
    if image_col not in cols and text_col not in cols:
        raise UserError(
            f"manifest {url} has neither image column {image_col!r} nor text column {text_col!r} "
            f"(columns: {', '.join(cols)}); map them with --image-col / --text-col"
        )
    resolve, base = _resolver(url)
    rows = []
    for i, row in enumerate(table.to_pylist()):
        image = row.pop(image_col, None)
        caption = row.pop(text_col, None)
        key = row.pop(key_col, None) if key_col else None
        sources = {}
        if image not in (None, ""):
            sources["image"] = resolve(str(image))
        if key in (None, ""):
            if image not in (None, ""):
                stem = posixpath.splitext(str(image).split("?")[0])[0]
                key = stem.split("://", 1)[-1].lstrip("/") if "://" in stem or stem.startswith("/") else stem
                if stem.startswith(base + "/"):
                    key = stem[len(base) + 1:]
            else:
                key = f"row{i:09d}"
        meta = {k: v for k, v in row.items() if v is not None}
        rows.append((str(key), sources, None if caption is None else str(caption), meta))
    return rows
