"""A sample on its way through a unit, and what every per-record step shares: reading a source,
the base row, turning any exception into the record's outcome, and the sample's ``json`` member."""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

from PIL import Image

from mmdata.errors import SampleError, SampleFailed
from mmdata.records import Record
from mmdata.storage import TooLarge, read_bytes


@dataclass
class Sample:
    """A record on its way through the unit: the row that will be written, and the tar members."""

    record: Record
    row: dict
    members: dict[str, bytes] = field(default_factory=dict)
    caption: Optional[str] = None
    image: Optional[Image.Image] = None  # kept only when an encoder will embed it
    audio: Optional[tuple[Any, int]] = None  # (samples, rate), kept only until an audio encoder embeds it
    audio_embedding: Any = None  # the audio encoder's row for this sample
    meta: dict = field(default_factory=dict)  # the json member's "meta": manifest columns and .json metadata
    doc: dict = field(default_factory=dict)  # further top-level fields of the json member (segments: start, end …)
    view_parent: Optional["Sample"] = None  # for an augmented view (mmdata.pipeline.samples.views): the sample it was made from
    downloads: dict = field(default_factory=dict, repr=False)  # URL → its download (mmdata.sources.http.Fetched)


class Timer:
    """Accumulated seconds per stage for a unit's stats."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, stage: str, start: float) -> None:
        self.seconds[stage] += time.perf_counter() - start


def read_source(url: str, modality: str, max_bytes: Optional[int] = None,
                max_source_bytes: Optional[int] = None) -> bytes:
    """The source's bytes. A file whose size (stat, before reading) is over ``max_source_bytes``
    is ``too_large:source``; a sidecar over ``max_bytes`` (captions, .json, transcripts) is
    ``too_large:<modality>``, found after reading at most ``max_bytes + 1`` bytes of it."""
    try:
        data = read_bytes(url, max_bytes, max_source_bytes)
    except TooLarge as exc:
        raise SampleFailed("too_large:source", str(exc)) from None
    except (OSError, ValueError) as exc:
        raise SampleFailed(f"read:{modality}", f"{url}: {exc}") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise SampleFailed(f"too_large:{modality}", f"{url}: over --max-sidecar-bytes ({max_bytes})")
    return data


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN/Infinity float replaced by None (JSON has no such token)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps_json(obj: Any, warnings: Optional[list] = None, **kw) -> str:
    """Strict JSON: NaN and ±Infinity are written as null (recorded as ``nonfinite:json_null`` in ``warnings``)."""
    try:
        return json.dumps(obj, sort_keys=True, default=str, allow_nan=False, **kw)
    except ValueError:
        if warnings is not None and "nonfinite:json_null" not in warnings:
            warnings.append("nonfinite:json_null")
        return json.dumps(_finite(obj), sort_keys=True, default=str, allow_nan=False, **kw)


def base_row(record: Record) -> dict:
    row = {
        "key": record.key,
        "id": record.id,
        "warnings": list(record.warnings),
        "source_image": record.sources.get("image"),
        "source_text": record.sources.get("text"),
        "source_json": record.sources.get("json"),
        "source_audio": record.sources.get("audio"),
        "source_bytes": 0,
        "meta": None,
    }
    if record.meta:
        row["meta"] = dumps_json(record.meta, row["warnings"])
    return row


def as_sample_error(exc: Exception) -> SampleError:
    """Any exception raised while handling one record, as that record's outcome: a ``SampleError``
    as it is, anything else (``MemoryError``, ``RecursionError``, a ``TypeError`` from a malformed
    sidecar …) ``failed`` with reason ``error:<ExceptionType>`` and the message as its detail."""
    if isinstance(exc, SampleError):
        return exc
    return SampleFailed(f"error:{type(exc).__name__}", str(exc)[:500])


def mark_not_written(sample: Sample, err: SampleError) -> Sample:
    """Record ``err`` as the sample's outcome and drop what it was carrying."""
    sample.row.update(status=err.status, reason=err.reason)
    sample.members, sample.image, sample.audio = {}, None, None
    if err.detail:
        sample.row["warnings"].append(f"detail:{err.detail[:200]}")
    return sample


# Row columns repeated in an audio sample's json member when they are set.
AUDIO_DOC_FIELDS = ("parent_key", "start", "end", "clip_start", "clip_end", "duration", "sample_rate", "channels",
                    "audio_sha256")


def write_json(sample: Sample) -> None:
    """The sample's ``json`` member: ids, sources, image and audio facts, metadata, caption."""
    record, row = sample.record, sample.row
    doc = {
        "key": row["key"],
        "id": row["id"],
        "sources": record.sources,
        "width": row.get("width"),
        "height": row.get("height"),
        "original_width": row.get("orig_width"),
        "original_height": row.get("orig_height"),
        "image_sha256": row.get("image_sha256"),
        "meta": sample.meta,
    }
    doc.update({k: row[k] for k in AUDIO_DOC_FIELDS if row.get(k) is not None})
    doc.update(sample.doc)
    if sample.caption is not None:
        doc["caption"] = sample.caption
    sample.members["json"] = dumps_json(doc, row["warnings"], ensure_ascii=False).encode("utf-8")
