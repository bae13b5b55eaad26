"""One record through the per-sample transforms: read → pair → image → text → metadata.

Returns the record's parquet row and, when it is written, the members of its tar sample. Every
outcome is explicit: ``written``, or ``filtered`` / ``failed`` with a reason.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

from PIL import Image

from mmdata.config import BuildConfig
from mmdata.errors import SampleError, SampleFailed, SampleFiltered
from mmdata.records import Record
from mmdata.storage import read_bytes
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


def _read(url: str, modality: str) -> bytes:
    try:
        return read_bytes(url)
    except (OSError, ValueError) as exc:
        raise SampleFailed(f"read:{modality}", f"{url}: {exc}") from None


def base_row(record: Record) -> dict:
    return {
        "key": record.key,
        "id": record.id,
        "warnings": list(record.warnings),
        "source_image": record.sources.get("image"),
        "source_text": record.sources.get("text"),
        "source_json": record.sources.get("json"),
        "source_bytes": 0,
        "meta": json.dumps(record.meta, sort_keys=True, default=str) if record.meta else None,
    }


class RecordProcessor:
    """The per-sample transforms for one configuration (built once per worker process)."""

    def __init__(self, config: BuildConfig):
        self.config = config
        self.image = ImageTransform(image_options(config))
        self.keep_images = "image" in config.embedded_modalities

    def check_pairing(self, record: Record) -> None:
        if record.problem:
            kind = "filtered" if record.problem.startswith("unsupported:") else "failed"
            raise (SampleFiltered if kind == "filtered" else SampleFailed)(record.problem)
        has = {"image": "image" in record.sources, "text": "text" in record.sources or record.caption is not None,
               "audio": "audio" in record.sources}
        for modality in self.config.require:
            if not has[modality]:
                raise SampleFiltered(f"missing:{modality}")

    def __call__(self, record: Record, timer: Timer) -> Sample:
        sample = Sample(record, base_row(record))
        try:
            self.check_pairing(record)
            self._text(sample, timer)
            self._image(sample, timer)
            self._json(sample, timer)
        except SampleError as err:
            sample.row.update(status=err.status, reason=err.reason)
            sample.members, sample.image = {}, None
            if err.detail:
                sample.row["warnings"].append(f"detail:{err.detail[:200]}")
            return sample
        sample.row.update(status="written", reason=None)
        return sample

    def _text(self, sample: Sample, timer: Timer) -> None:
        record = sample.record
        start = time.perf_counter()
        if "text" in record.sources:
            data = _read(record.sources["text"], "text")
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
        data = _read(url, "image")
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

    def _json(self, sample: Sample, timer: Timer) -> None:
        record = sample.record
        extra = dict(record.meta)
        if "json" in record.sources:
            data = _read(record.sources["json"], "json")
            sample.row["source_bytes"] += len(data)
            try:
                loaded = json.loads(data.decode("utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise SampleFailed("decode:json", str(exc)) from None
            extra.update(loaded if isinstance(loaded, dict) else {"json": loaded})
        row = sample.row
        doc = {
            "key": record.key,
            "id": record.id,
            "sources": record.sources,
            "width": row.get("width"),
            "height": row.get("height"),
            "original_width": row.get("orig_width"),
            "original_height": row.get("orig_height"),
            "image_sha256": row.get("image_sha256"),
            "meta": extra,
        }
        if sample.caption is not None:
            doc["caption"] = sample.caption
        sample.members["json"] = json.dumps(doc, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
