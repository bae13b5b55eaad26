"""csv/tsv/jsonl manifests read as streams, block by block, with memory bounded by the block size (not
the file's): the batches ``manifest.read_manifest_batches`` turns into plan rows. Parquet, the entry
points and the columns' conversion are in ``manifest``.
"""
from __future__ import annotations

import io
import json
import math
import re

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson

from mmdata.errors import UserError

BATCH_ROWS = 1 << 16  # rows per record batch handed on (parquet's too)

# A first pass settles each column's type over the whole file, as Arrow's whole-file reader types it (a
# column of integers in the first block and text later is text, not an error), the next pass converts.
TEXT_BLOCK = 1 << 20
# Arrow's CSV inference tries these in order and keeps the first that converts every value of the column.
_CSV_LADDER = [pa.null(), pa.int64(), pa.bool_(), pa.date32(), pa.time32("s"), pa.timestamp("s"),
               pa.timestamp("s", "UTC"), pa.timestamp("ns"), pa.timestamp("ns", "UTC"), pa.float64(), pa.string(),
               pa.binary()]
_CONVERSION = re.compile(r"In CSV column #(\d+): .*CSV conversion error to ([^:]+):")


def cannot_read(url: str, fmt: str, exc: BaseException) -> UserError:
    """The one-line error of a manifest that cannot be read as ``fmt``."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UserError(f"cannot read manifest {url} as {fmt}: {text}")


def _csv_reader(url: str, fmt: str, fh, types: dict):
    return pacsv.open_csv(
        fh, read_options=pacsv.ReadOptions(block_size=TEXT_BLOCK),
        parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(strings_can_be_null=True, column_types=types))


def _csv_types(url: str, fmt: str) -> tuple[list[str], dict]:
    """The column names and the type of each column over the whole file (one streaming pass per loosened
    column type; a file whose first block types every column right takes one)."""
    types: dict = {}
    first = None  # the schema inferred from the first block
    while True:
        with fsspec.open(url, "rb") as fh:
            try:
                reader = _csv_reader(url, fmt, fh, types)
                first = first or reader.schema
                for _ in reader:
                    pass
                return reader.schema.names, dict(zip(reader.schema.names, reader.schema.types))
            except pa.ArrowInvalid as exc:
                m = _CONVERSION.search(str(exc))
                if not m or first is None:
                    raise cannot_read(url, fmt, exc) from None
                name = first.names[int(m.group(1))]
                failed = types.get(name, first.field(name).type)
                rung = _CSV_LADDER.index(failed) if failed in _CSV_LADDER else len(_CSV_LADDER) - 1
                if rung + 1 >= len(_CSV_LADDER):
                    raise cannot_read(url, fmt, exc) from None
                types[name] = _CSV_LADDER[rung + 1]
            except (OSError, ValueError) as exc:
                raise cannot_read(url, fmt, exc) from None


def csv_batches(url: str, fmt: str):
    """``(column names, iterator of record batches)`` of a csv/tsv file, typed over the whole file."""
    names, types = _csv_types(url, fmt)

    def batches():
        with fsspec.open(url, "rb") as fh:
            try:
                yield from _csv_reader(url, fmt, fh, types)
            except (pa.ArrowInvalid, OSError, ValueError) as exc:
                raise cannot_read(url, fmt, exc) from None

    return names, batches()


def _line_chunks(url: str):
    """The file's bytes in pieces of about TEXT_BLOCK that end at a line end (a longer line is one piece)."""
    with fsspec.open(url, "rb") as fh:
        rest = b""
        while True:
            data = fh.read(TEXT_BLOCK)
            if not data:
                break
            data = rest + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            yield data[:cut]
            rest = data[cut:]
        if rest:
            yield rest


def jsonl_batches(url: str, fmt: str):
    """jsonl block by block: Arrow parses each block, the blocks' types unified as Arrow's whole-file reader
    unifies them (integers and floats give floats); where Arrow refuses the file (a column whose type
    changes, NaN tokens, a byte-order mark), the loose reader below, in two bounded passes."""
    schema = None
    strict = True
    try:
        for i, chunk in enumerate(_line_chunks(url)):
            if i == 0 and chunk.startswith(b"\xef\xbb\xbf"):
                strict = False
                break
            chunk.decode("utf-8")  # Arrow's JSON parser lets bytes that are not UTF-8 through into text
            got = pajson.read_json(io.BytesIO(chunk)).schema
            schema = got if schema is None else pa.unify_schemas([schema, got], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        strict = False
    except (OSError, ValueError) as exc:
        raise cannot_read(url, fmt, exc) from None
    if strict and schema is None:  # an empty file: Arrow refuses it, the loose reader finds no columns
        strict = False
    if strict:
        options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error")
        try:
            for chunk in _line_chunks(url):  # the unified types convert every block (else: loose)
                pajson.read_json(io.BytesIO(chunk), parse_options=options)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            strict = False
    if strict:
        def batches():
            try:
                for chunk in _line_chunks(url):
                    yield from pajson.read_json(io.BytesIO(chunk), parse_options=options).to_batches(BATCH_ROWS)
            except (pa.ArrowInvalid, OSError, ValueError) as exc:
                raise cannot_read(url, fmt, exc) from None

        return schema.names, batches()
    return _jsonl_loose_batches(url, fmt)


def _loose_rows(url: str, fmt: str):
    """Lists of row dicts, a block at a time, as ``manifest._read_jsonl_loose`` parses them."""
    try:
        for i, chunk in enumerate(_line_chunks(url)):
            text = chunk.decode("utf-8-sig" if i == 0 else "utf-8")
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            if not all(isinstance(r, dict) for r in rows):
                raise ValueError("a line is not a JSON object")
            for r in rows:  # NaN / Infinity tokens are no value
                r.update({k: None for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)})
            yield rows
    except RecursionError:
        raise cannot_read(url, fmt, ValueError("a JSON value is nested too deeply")) from None
    except (OSError, ValueError) as exc:
        raise cannot_read(url, fmt, exc) from None


def _jsonl_loose_batches(url: str, fmt: str):
    """The loose reader streamed: a first pass finds the columns (the first row's, as ``Table.from_pylist``
    takes them) and which hold more than one type; the second converts block by block."""
    names: list[str] | None = None
    cols: dict[str, set] = {}
    for rows in _loose_rows(url, fmt):
        if names is None and rows:
            names = list(rows[0])
        for r in rows:
            for k, v in r.items():
                if v is not None:
                    cols.setdefault(k, set()).add(type(v))
    names = names or []
    mixed = {k for k, types in cols.items() if len(types) > 1 or types & {dict, list}}

    def batches():
        for rows in _loose_rows(url, fmt):
            for r in rows:
                for k in mixed & r.keys():
                    v = r[k]
                    r[k] = v if v is None or isinstance(v, str) else json.dumps(v)
            if rows:
                try:
                    yield from pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows]).to_batches(BATCH_ROWS)
                except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
                    raise cannot_read(url, fmt, exc) from None

    return names, batches()
