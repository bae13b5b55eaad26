"""Arrow schemas of the tables mmdata writes. ``schemas/*.json`` mirror them for users; a test
keeps the two in sync."""
from __future__ import annotations

import sys

import pyarrow as pa

PLAN_SCHEMA = pa.schema(
    [
        pa.field("unit", pa.int32(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("id", pa.int64(), nullable=False),
        pa.field("sources", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("meta", pa.string(), nullable=False),
        pa.field("problem", pa.string()),
        pa.field("warnings", pa.list_(pa.string()), nullable=False),
        pa.field("reserved", pa.list_(pa.string())),
    ]
)

SHARD_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("id", pa.int64(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("warnings", pa.list_(pa.string()), nullable=False),
        pa.field("row", pa.int32()),
        pa.field("source_image", pa.string()),
        pa.field("source_text", pa.string()),
        pa.field("source_json", pa.string()),
        pa.field("source_bytes", pa.int64(), nullable=False),
        pa.field("image_sha256", pa.string()),
        pa.field("text_sha256", pa.string()),
        pa.field("source_format", pa.string()),
        pa.field("orig_width", pa.int32()),
        pa.field("orig_height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("image_format", pa.string()),
        pa.field("image_bytes", pa.int64()),
        pa.field("reencoded", pa.bool_()),
        pa.field("caption", pa.string()),
        pa.field("meta", pa.string()),
        # augmented views (null for originals)
        pa.field("view_of", pa.string()),
        pa.field("view", pa.int32()),
        # audio (null for samples without audio)
        pa.field("parent_key", pa.string()),
        pa.field("source_audio", pa.string()),
        pa.field("source_transcript", pa.string()),
        pa.field("audio_sha256", pa.string()),
        pa.field("audio_container", pa.string()),
        pa.field("source_sample_rate", pa.int32()),
        pa.field("source_channels", pa.int32()),
        pa.field("source_duration", pa.float64()),
        pa.field("segment_index", pa.int32()),
        pa.field("segment_part", pa.int32()),
        pa.field("start", pa.float64()),
        pa.field("end", pa.float64()),
        pa.field("clip_start", pa.float64()),
        pa.field("clip_end", pa.float64()),
        pa.field("duration", pa.float64()),
        pa.field("sample_rate", pa.int32()),
        pa.field("channels", pa.int32()),
        pa.field("audio_bytes", pa.int64()),
    ]
)

SCHEMAS = {"plan_table": PLAN_SCHEMA, "shard_table": SHARD_SCHEMA}


def schema_to_json(schema: pa.Schema) -> list[dict]:
    """A plain description of ``schema``: name, arrow type, nullable."""
    return [{"name": f.name, "type": _type_name(f.type), "nullable": f.nullable} for f in schema]


def _type_name(t: pa.DataType) -> str:
    """Arrow type as text, with list element names dropped (parquet renames them on read)."""
    if pa.types.is_list(t):
        return f"list<{_type_name(t.value_type)}>"
    return str(t)


def skip_pandas_probe() -> bool:
    """Spare this process pyarrow's import of pandas (~0.3 s of CPU, the largest part of a worker's
    start-up); True when it was spared.

    The first time ``pa.array`` is given a list, pyarrow imports pandas only to ask whether the list
    is a pandas object, and remembers the answer. Made here while pandas cannot be imported, that
    first probe records "no pandas"; pandas stays importable for everyone else. mmdata never hands
    pandas objects to pyarrow, but afterwards pyarrow would treat one given to ``pa.array`` as a
    plain sequence (a float Series' NaN would stay NaN, not null) until something asks it for pandas
    outright (``to_pandas``, ``from_pandas``), which imports it as usual. So only processes mmdata
    owns call it (the local engine's workers), never library calls in a user's process; one that
    already imported pandas is left alone. pyarrow's C++ side imports pandas too, whenever it infers
    a type from Python values (``pa.array([1, 2])``, ``pc.equal(column, 3)``): a worker's code
    passes typed values (``pa.scalar(3, pa.int32())``); ``tests/test_startup_imports.py`` checks.
    """
    if "pandas" in sys.modules:
        return False
    sys.meta_path.insert(0, _NoPandas)
    try:
        pa.array([], pa.null())
    finally:
        sys.meta_path.remove(_NoPandas)
    return "pandas" not in sys.modules


class _NoPandas:
    """A meta path finder that refuses pandas (Cython's import reads ``sys.modules`` directly,
    so a ``None`` entry there would not do)."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError(f"{name} skipped by mmdata.schema.skip_pandas_probe")
