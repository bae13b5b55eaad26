"""One record through the per-sample transforms: read → pair → text → image → audio → metadata.

Returns the record's parquet rows and, for those written, the members of their tar samples: one
sample per record, except a recording with a timed transcript, which becomes one sample per
segment (:mod:`mmdata.audio_samples`). Every outcome is explicit: ``written``, or ``filtered`` /
``failed`` with a reason; a record that fails before it is split is one row.
"""
from __future__ import annotations

import hashlib
import json
import math
import posixpath
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

from PIL import Image

from mmdata.config import BuildConfig
from mmdata.errors import SampleError, SampleFailed, SampleFiltered, UserError
from mmdata.records import Record
from mmdata.storage import TooLarge, read_bytes
from mmdata.transforms.image import ImageOptions, ImageTransform
from mmdata.transforms.text import clean_caption, decode_text


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
    view_parent: Optional["Sample"] = None  # for an augmented view (mmdata.views): the sample it was made from


class Timer:
    """Accumulated seconds per stage for a unit's stats."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, stage: str, start: float) -> None:
        self.seconds[stage] += time.perf_counter() - start


def image_options(config: BuildConfig) -> ImageOptions:
    return ImageOptions(
        size=config.image_size,
        resize_mode=config.resize_mode,
        only_if_bigger=config.resize_only_if_bigger,
        fmt=config.image_format,
        quality=config.image_quality,
        min_side=config.min_image_size,
        max_aspect_ratio=config.max_aspect_ratio,
        max_pixels=config.max_pixels,
    )


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


class RecordProcessor:
    """The per-sample transforms for one configuration (built once per worker process)."""

    def __init__(self, config: BuildConfig):
        self.config = config
        self.image = ImageTransform(image_options(config))
        # the resized image stays in memory for the encoder, and for the views to augment (no second decode)
        self.keep_images = "image" in config.embedded_modalities or config.n_views > 0
        self._audio = None

    @property
    def audio(self):
        """The audio stage, built on the first record with audio (it needs the ``audio`` extra)."""
        if self._audio is None:
            from mmdata.audio_samples import AudioStage

            self._audio = AudioStage(self.config)
        return self._audio

    def check_pairing(self, record: Record, text_from_transcript: bool = False) -> None:
        if record.problem:
            kind = "filtered" if record.problem.startswith("unsupported:") else "failed"
            raise (SampleFiltered if kind == "filtered" else SampleFailed)(record.problem)
        has = {"image": "image" in record.sources,
               "text": "text" in record.sources or record.caption is not None or text_from_transcript,
               "audio": "audio" in record.sources}
        for modality in self.config.require:
            if not has[modality]:
                raise SampleFiltered(f"missing:{modality}")

    def __call__(self, record: Record, timer: Timer) -> list[Sample]:
        """The record's samples: one, or one per transcript segment."""
        sample = Sample(record, base_row(record))
        try:
            return self._process(sample, timer)
        except UserError:
            raise  # not about this record (a missing extra): it stops the unit with one line
        except Exception as exc:  # noqa: BLE001 — one record's problem stays in its row; the unit goes on
            sample.caption = None
            return [mark_not_written(sample, as_sample_error(exc))]

    def _process(self, sample: Sample, timer: Timer) -> list[Sample]:
        record = sample.record
        audio = "audio" in record.sources
        self.check_pairing(record, text_from_transcript=audio and ("transcript" in record.sources or "json" in record.sources))
        transcript = None
        if audio:  # a .json beside audio may be its transcript: read it now, once
            json_data = self._read_json(sample)
            transcript = self.audio.find_transcript(sample, json_data)
            if transcript is None:
                self.check_pairing(record)  # the .json is metadata: it brings no text
            elif transcript.ext == "json":
                json_data = None
        elif "transcript" in record.sources:
            sample.row["warnings"].append("ignored:" + posixpath.basename(record.sources["transcript"]))
        self._text(sample, timer, recording=transcript is not None)
        self._image(sample, timer)
        self._meta(sample, json_data if audio else self._read_json(sample))
        if transcript is not None:
            return self.audio.segments(sample, transcript, timer)
        if audio:
            self.audio.clip(sample, timer)
        write_json(sample)
        sample.row.update(status="written", reason=None)
        return [sample]

    def _text(self, sample: Sample, timer: Timer, recording: bool = False) -> None:
        """The caption. For a recording split by its transcript (``recording``), a .txt beside it
        describes the whole recording: it goes into every segment's json as ``recording_caption``."""
        record = sample.record
        start = time.perf_counter()
        if "text" in record.sources:
            data = read_source(record.sources["text"], "text", self.config.max_sidecar_bytes,
                               self.config.max_source_bytes)
            sample.row["source_bytes"] += len(data)
            sample.row["text_sha256"] = hashlib.sha256(data).hexdigest()
            text, warnings = decode_text(data)
        elif record.caption is not None:
            text, warnings = record.caption, []
        else:
            return
        caption, more = clean_caption(text, self.config.max_caption_chars)
        sample.row["warnings"] += warnings + more
        timer.add("text", start)
        if recording:
            if caption:
                sample.doc["recording_caption"] = caption
            return
        if len(caption) < max(self.config.min_caption_chars, 1):
            if "text" in self.config.require:
                raise SampleFiltered("empty:text", f"{len(caption)} characters after cleaning")
            sample.row["warnings"].append("caption_dropped:too_short")
            return
        sample.caption = caption
        sample.row["caption"] = caption
        sample.members["txt"] = caption.encode("utf-8")

    def _image(self, sample: Sample, timer: Timer) -> None:
        url = sample.record.sources.get("image")
        if url is None:
            return
        start = time.perf_counter()
        data = read_source(url, "image", max_source_bytes=self.config.max_source_bytes)
        timer.add("read", start)
        sample.row["source_bytes"] += len(data)
        sample.row["image_sha256"] = hashlib.sha256(data).hexdigest()
        start = time.perf_counter()
        try:
            result = self.image(data)
        finally:
            timer.add("image", start)
        sample.row.update(
            source_format=result.source_format,
            orig_width=result.orig_width,
            orig_height=result.orig_height,
            width=result.width,
            height=result.height,
            image_format=result.ext,
            image_bytes=len(result.data),
            reencoded=result.reencoded,
        )
        sample.members[result.ext] = result.data
        if self.keep_images:
            sample.image = result.image

    def _read_json(self, sample: Sample) -> Optional[bytes]:
        if "json" not in sample.record.sources:
            return None
        data = read_source(sample.record.sources["json"], "json", self.config.max_sidecar_bytes,
                           self.config.max_source_bytes)
        sample.row["source_bytes"] += len(data)
        return data

    def _meta(self, sample: Sample, json_data: Optional[bytes]) -> None:
        """Manifest columns and the .json sidecar's fields: the json member's ``meta``."""
        sample.meta = dict(sample.record.meta)
        if json_data is None:
            return
        try:
            loaded = json.loads(json_data.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise SampleFailed("decode:json", str(exc) or type(exc).__name__) from None
        sample.meta.update(loaded if isinstance(loaded, dict) else {"json": loaded})
