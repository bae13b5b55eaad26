"""One record through the per-sample transforms: read → pair → text → image → audio → metadata.

Returns the record's parquet rows and, for those written, the members of their tar samples: one
sample per record, except a recording with a timed transcript, which becomes one sample per
segment (:mod:`mmdata.pipeline.samples.audio`). Every outcome is explicit: ``written``, or ``filtered`` /
``failed`` with a reason; a record that fails before it is split is one row.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import time
from typing import Optional

from mmdata.config import BuildConfig
from mmdata.errors import SampleFailed, SampleFiltered, UserError
from mmdata.pipeline.samples.sample import Sample, Timer, as_sample_error, base_row, mark_not_written, read_source, write_json
from mmdata.records import Record
from mmdata.transforms.image import ImageOptions, ImageTransform
from mmdata.transforms.text import clean_caption, decode_text


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
        jpeg_codec=config.jpeg_codec,
        resize_backend=config.resize_backend,
    )


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
            from mmdata.pipeline.samples.audio import AudioProcessor

            self._audio = AudioProcessor(self.config)
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

    def __call__(self, record: Record, timer: Timer, downloads: Optional[dict] = None) -> list[Sample]:
        """The record's samples: one, or one per transcript segment. ``downloads``: the record's
        http(s) sources already fetched by the unit (URL → ``Fetched``)."""
        sample = Sample(record, base_row(record), downloads=downloads or {})
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
            data = self._read(sample, record.sources["text"], "text", self.config.max_sidecar_bytes)
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
        data = self._read(sample, url, "image")
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
            sample.image = result.pil()

    def _read(self, sample: Sample, url: str, modality: str, max_bytes: Optional[int] = None) -> bytes:
        """A source's bytes: its download when the unit fetched it (or the reason it has none), else read."""
        got = sample.downloads.get(url)
        if got is None:
            return read_source(url, modality, max_bytes, self.config.max_source_bytes)
        if got.error is not None:
            raise got.error
        if max_bytes is not None and len(got.data) > max_bytes:
            raise SampleFailed(f"too_large:{modality}", f"{url}: over --max-sidecar-bytes ({max_bytes})")
        return got.data

    def _read_json(self, sample: Sample) -> Optional[bytes]:
        if "json" not in sample.record.sources:
            return None
        data = self._read(sample, sample.record.sources["json"], "json", self.config.max_sidecar_bytes)
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
