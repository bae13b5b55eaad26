"""A manifest source: a parquet/csv/tsv/jsonl table with one row per record.

Columns are mapped by name (``image_col``, ``text_col``, ``key_col``); every other column is kept
as metadata. Relative paths are resolved against the manifest's folder; URLs pass through.
This module holds the entry points (``read_manifest``, ``read_manifest_batches``), the parquet reader
and the columns' conversion; ``manifest_stream`` reads csv/tsv/jsonl block by block.
"""
from __future__ import annotations

import io
import json
import math
import posixpath

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from mmdata.arrow import numpy_values, parquet_table
from mmdata.errors import UserError
from mmdata.sources.manifest_stream import (
    BATCH_ROWS,
    cannot_read,
    csv_batches,
    jsonl_batches,
)

MANIFEST_EXTS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def manifest_format(url: str) -> str | None:
    """The manifest format of ``url`` from its extension, or None for a folder / other file."""
    return MANIFEST_EXTS.get(posixpath.splitext(url.split("?")[0])[1].lower())


def _read_table(url: str, fmt: str) -> pa.Table:
    with fsspec.open(url, "rb") as fh:
        data = fh.read()
    try:
        if fmt == "parquet":
            return parquet_table(data)
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


def _check_columns(url: str, cols: list[str], image_col: str, text_col: str, key_col: str | None,
                   audio_col: str | None = None) -> None:
    """One UserError line when the manifest lacks the key or audio column asked for, or has none of the
    image, text (and audio) columns."""
    for what, col in (("key", key_col), ("audio", audio_col)):
        if col and col not in cols:
            raise UserError(f"manifest {url} has no {what} column {col!r} (columns: {', '.join(cols)})")
    if image_col not in cols and text_col not in cols and not audio_col:
        raise UserError(
            f"manifest {url} has neither image column {image_col!r} nor text column {text_col!r} "
            f"(columns: {', '.join(cols)}); map them with --image-col / --text-col"
        )


def read_manifest(url: str, image_col: str, text_col: str, key_col: str | None, audio_col: str | None = None):
    """Rows of the manifest as ``(raw_key, sources, caption, meta)``, in manifest order (the whole file
    at once, row by row: the reference the streaming reader below is tested against)."""
    fmt = manifest_format(url)
    table = _read_table(url, fmt)
    cols = table.column_names
    _check_columns(url, cols, image_col, text_col, key_col, audio_col)
    resolve, base = _resolver(url)
    rows = []
    for i, row in enumerate(table.to_pylist()):
        image = row.pop(image_col, None)
        audio = row.pop(audio_col, None) if audio_col else None
        caption = row.pop(text_col, None)
        key = row.pop(key_col, None) if key_col else None
        sources = {}
        if image not in (None, ""):
            sources["image"] = resolve(str(image))
        if audio not in (None, ""):
            sources["audio"] = resolve(str(audio))
            if image in (None, ""):
                image = audio  # the key comes from the audio path
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


# Streaming, vectorised reading for plans of any size: the same values as ``read_manifest``, as Arrow
# batches of ``raw_key, sources, caption, meta`` (sources and meta already JSON text, as in the plan).
# Parquet is read here by record batch; csv/tsv/jsonl by block in manifest_stream.

_STRING_TYPES = (pa.string(), pa.large_string())


def _after_first(arr: pa.Array, sep: str) -> pa.Array:
    """``value.split(sep, 1)[-1]`` of each value (nulls stay null)."""
    import pyarrow.compute as pc

    parts = pc.split_pattern(arr, sep, max_splits=1)
    offsets = numpy_values(parts.offsets)
    last = np.maximum(offsets[1:] - 1, offsets[:-1])
    flat = parts.values
    return pc.if_else(arr.is_valid(), flat.take(pa.array(np.minimum(last, max(len(flat) - 1, 0)))) if len(flat) else arr,
                      pa.nulls(len(arr), pa.string()))


_JSON_ESCAPED = [b < 0x20 or b > 0x7e or b in b'"\\' for b in range(256)]  # bytes json.dumps escapes


def _rows_with_bytes(arr: pa.Array, which: list[bool]) -> np.ndarray:
    """For each string of ``arr`` (a StringArray), whether it holds a byte marked in ``which`` (256 flags)."""

    table = np.array(which, dtype=bool)
    n = len(arr)
    out = np.zeros(n, dtype=bool)
    if n == 0 or arr.buffers()[2] is None:
        return out
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset: arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)
    step = 1 << 16
    for lo in range(0, n, step):
        o = offsets[lo: lo + step + 1].astype(np.int64)
        marked = np.concatenate([[0], np.cumsum(table[data[o[0]:o[-1]]], dtype=np.int32)])
        out[lo: lo + len(o) - 1] = marked[o[1:] - o[0]] > marked[o[:-1] - o[0]]
    return out


def _strip_extension(arr: pa.Array) -> pa.Array:
    """``posixpath.splitext(v)[0]`` of each value: the reversed string loses ``txe.`` where a character
    other than a dot precedes the last dot within the base name."""
    import pyarrow.compute as pc

    rev = pc.utf8_reverse(arr)
    return pc.utf8_reverse(pc.replace_substring_regex(rev, r"^[^/.]*\.([^/]*[^/.])", r"\1", max_replacements=1))


def json_strings(arr: pa.Array) -> pa.Array:
    """Each string of ``arr`` as ``json.dumps`` writes it (nulls stay null)."""
    import pyarrow.compute as pc

    arr = arr.cast(pa.string()) if arr.type != pa.string() else arr
    plain = pa.array(~_rows_with_bytes(arr, _JSON_ESCAPED))
    quoted = pc.binary_join_element_wise('"', arr, '"', "")
    if pc.all(plain).as_py():
        return quoted
    odd = pc.invert(plain)
    escaped = [json.dumps(v) for v in arr.filter(odd).to_pylist()]
    return pc.replace_with_mask(quoted, odd, pa.array(escaped, pa.string()))


def _as_text(arr: pa.Array) -> pa.Array:
    """``str(value)`` of each value (nulls stay null): cast where Arrow writes what Python does."""
    if arr.type in _STRING_TYPES:
        return arr.cast(pa.string())
    if pa.types.is_integer(arr.type):
        return arr.cast(pa.string())
    return pa.array([None if v is None else str(v) for v in arr.to_pylist()], pa.string())


def _json_values(arr: pa.Array) -> pa.Array:
    """Each value as ``json.dumps(v, sort_keys=True, default=str)`` writes it in a metadata object."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if arr.type in _STRING_TYPES:
        return json_strings(arr)
    if pa.types.is_integer(arr.type) or pa.types.is_boolean(arr.type):
        return arr.cast(pa.string())
    if pa.types.is_floating(arr.type):
        return _json_floats(arr.cast(pa.float64()))
    return pa.array([None if v is None else json.dumps(v, sort_keys=True, default=str) for v in arr.to_pylist()],
                    pa.string())


def _json_floats(arr: pa.Array) -> pa.Array:
    """``repr`` of each double as json writes it (``NaN``, ``Infinity``): Arrow's shortest text where it
    is Python's too (plain decimals in Python's positional range; whole numbers get ``.0``), Python's elsewhere."""
    import pyarrow.compute as pc

    values = np.abs(arr.fill_null(0.0).to_numpy(zero_copy_only=False))
    text = arr.cast(pa.string())
    has_dot, has_e = pc.match_substring(text, "."), pc.match_substring(text, "e")
    positional = pa.array((values >= 1e-4) & (values < 1e16))
    whole = pa.array(np.isfinite(values) & (values < 1e16))
    plain = pc.and_(pc.and_(has_dot, pc.invert(has_e)), positional)
    integral = pc.and_(pc.and_(pc.invert(has_dot), pc.invert(has_e)), whole)
    text = pc.if_else(integral, pc.binary_join_element_wise(text, ".0", ""), text)
    rest = pc.and_(pc.invert(pc.or_(plain, integral)), arr.is_valid())
    if pc.any(rest).as_py():
        fixed = [json.dumps(v) for v in arr.filter(rest).to_pylist()]
        text = pc.replace_with_mask(text, rest, pa.array(fixed, pa.string()))
    return text


def _meta_json(batch: pa.Table, names: list[str]) -> pa.Array:
    """``json.dumps({k: v for k, v in row.items() if v is not None}, sort_keys=True, default=str)`` per row."""
    import pyarrow.compute as pc

    n = batch.num_rows
    parts = []
    for name in sorted(names):
        col = batch.column(name).combine_chunks()
        if pa.types.is_null(col.type):
            continue
        parts.append(pc.fill_null(pc.binary_join_element_wise(", " + json.dumps(name) + ": ", _json_values(col), ""), ""))
    if not parts:
        return pa.array(["{}"] * n, pa.string())
    body = pc.utf8_slice_codeunits(pc.binary_join_element_wise(*parts, ""), start=2)
    return pc.binary_join_element_wise("{", body, "}", "")


def _open_batches(url: str, fmt: str):
    """``(column names, iterator of record batches)``: parquet by record batch, csv/tsv/jsonl by block
    (never the whole file, never as Python rows except for loose jsonl, a block at a time)."""
    if fmt in ("csv", "tsv"):
        return csv_batches(url, fmt)
    if fmt == "jsonl":
        return jsonl_batches(url, fmt)
    fh = fsspec.open(url, "rb").open()
    try:
        pf = pq.ParquetFile(fh)
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        fh.close()
        raise UserError(f"cannot read manifest {url} as {fmt}: {str(exc).splitlines()[0]}") from None

    def batches():
        try:
            yield from pf.iter_batches(batch_size=BATCH_ROWS, use_threads=True)
        except (pa.ArrowInvalid, OSError, ValueError) as exc:
            raise UserError(f"cannot read manifest {url} as {fmt}: {str(exc).splitlines()[0]}") from None
        finally:
            fh.close()

    return pf.schema_arrow.names, batches()


def _resolve_paths(image: pa.Array, base: str, fs, local: bool) -> tuple[pa.Array, pa.Array]:
    """``(has a value, the value resolved as _resolver resolves it)`` of a column of source paths."""
    import pyarrow.compute as pc

    has_image = pc.fill_null(pc.not_equal(image, ""), False)
    # sources: URLs as they are, absolute paths as they are, relative ones joined to the manifest's folder
    url_like = pc.fill_null(pc.match_substring(image, "://"), False)
    absolute = pc.fill_null(pc.starts_with(image, "/"), False)
    joined = pc.binary_join_element_wise(base, image, "/") if base else image
    odd = pc.fill_null(pc.match_substring_regex(joined, r"(^|/)\.{1,2}(/|$)|//|/$"), False)
    odd = pc.and_(pc.and_(odd, has_image), pc.invert(pc.or_(url_like, absolute)))
    if pc.any(odd).as_py():  # ".", ".." or "//" in a relative path: normalised by posixpath
        fixed = [posixpath.normpath(v) for v in joined.filter(odd).to_pylist()]
        joined = pc.replace_with_mask(joined, odd, pa.array(fixed, pa.string()))
    full = pc.if_else(absolute, image, joined)
    if not local:  # a remote manifest's paths keep its protocol
        todo = pc.and_(has_image, pc.invert(url_like))
        if pc.any(todo).as_py():
            fixed = [fs.unstrip_protocol(v) for v in full.filter(todo).to_pylist()]
            full = pc.replace_with_mask(full, todo, pa.array(fixed, pa.string()))
    return has_image, pc.if_else(url_like, image, full)


def read_manifest_batches(url: str, image_col: str, text_col: str, key_col: str | None, audio_col: str | None = None):
    """The manifest as Arrow tables of ``raw_key, sources, caption, meta`` (``sources`` and ``meta`` JSON
    text), in manifest order: the values ``read_manifest`` gives, computed column by column."""
    import pyarrow.compute as pc

    fmt = manifest_format(url)
    _, base = _resolver(url)
    fs, _ = fsspec.core.url_to_fs(url)
    local = isinstance(fs, LocalFileSystem)
    cols, batches = _open_batches(url, fmt)
    _check_columns(url, cols, image_col, text_col, key_col, audio_col)
    offset = 0
    for batch in batches:
        batch = pa.Table.from_batches([batch])
        n = batch.num_rows
        if n == 0:
            continue
        cols = batch.column_names
        none = pa.nulls(n, pa.string())
        image = _as_text(batch.column(image_col).combine_chunks()) if image_col in cols else none
        text = (_as_text(batch.column(text_col).combine_chunks())
                if text_col in cols and text_col != image_col else none)
        key = (_as_text(batch.column(key_col).combine_chunks())
               if key_col and key_col not in (image_col, text_col) else none)
        has_image, resolved = _resolve_paths(image, base, fs, local)
        sources = pc.if_else(has_image, pc.binary_join_element_wise('{"image": ', json_strings(resolved), "}", ""),
                             pa.scalar("{}"))
        if audio_col and audio_col not in (image_col, text_col, key_col):
            audio = _as_text(batch.column(audio_col).combine_chunks())
            has_audio, heard = _resolve_paths(audio, base, fs, local)
            if pc.any(has_audio).as_py():  # {"audio": …, "image": …} as json.dumps(sort_keys=True) writes it
                part = pc.binary_join_element_wise('"audio": ', json_strings(heard), "")
                sep = pc.if_else(has_image, pa.scalar(", "), pa.scalar(""))
                rest = pc.utf8_slice_codeunits(sources, start=1)
                sources = pc.if_else(has_audio, pc.binary_join_element_wise("{", part, sep, rest, ""), sources)
                image = pc.if_else(has_image, image, audio)  # the key comes from the audio path
                has_image = pc.or_(has_image, has_audio)
        # keys: the key column, else the image's path without extension (relative to the manifest's folder)
        stem = image
        if pc.any(pc.match_substring(image, "?")).as_py():
            stem = pc.replace_substring_regex(image, r"(?s)\?.*$", "")
        stem = _strip_extension(stem)
        after_scheme = _after_first(stem, "://")
        derived = pc.if_else(pc.or_(pc.match_substring(stem, "://"), pc.starts_with(stem, "/")),
                             pc.utf8_ltrim(after_scheme, characters="/"), stem)
        derived = pc.if_else(pc.starts_with(stem, base + "/"), pc.utf8_slice_codeunits(stem, start=len(base) + 1),
                             derived)
        if not pc.all(has_image).as_py():
            rows = pa.array([f"row{i:09d}" for i in range(offset, offset + n)], pa.string())
            derived = pc.if_else(has_image, derived, rows)
        raw_key = pc.if_else(pc.fill_null(pc.not_equal(key, ""), False), key, derived)
        try:
            meta = _meta_json(batch, [c for c in cols if c not in (image_col, text_col, key_col, audio_col)])
        except RecursionError:
            raise cannot_read(url, fmt, ValueError("a value is nested too deeply")) from None
        yield pa.table({"raw_key": raw_key, "sources": sources, "caption": text, "meta": meta})
        offset += n
