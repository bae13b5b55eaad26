"""Arrow schemas of the tables mmdata writes. ``schemas/*.json`` mirror them for users; a test
keeps the two in sync."""
from __future__ import annotations

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
