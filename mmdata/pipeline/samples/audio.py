"""Audio in the unit of work: a clip becomes ``{key}.flac`` (and ``{key}.mel.npy``); a recording
with a timed transcript (.srt, .vtt, or a .json that reads as one) becomes one sample per segment,
keyed ``{key}_s0003`` (``plan_segments`` decides merges, splits and what is filtered).

The recording is decoded once, downmixed and resampled once, then cut; each segment then goes
through the same clip policy as a whole file (trim, duration limits, normalisation). Row times are
seconds in the source recording: ``start``/``end`` are the transcript's (plus ``segment_offset``),
``clip_start``/``clip_end`` the part the ``flac`` member holds (padding, clipping, trimming applied).
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from mmdata.config import BuildConfig
from mmdata.errors import SampleFailed, SampleFiltered, UserError
from mmdata.keys import key_to_id, sanitize_key
from mmdata.pipeline.samples.sample import Sample, Timer, as_sample_error, mark_not_written, read_source, write_json
from mmdata.transforms.text import clean_caption, decode_text
from mmdata.writers.npy import npy_bytes

try:
    from mmdata.sources.transcripts import PlannedSegment, cut, parse_transcript, plan_segments
    from mmdata.transforms.audio import (
        _EXT_CONTAINERS,
        decode_audio,
        downmix,
        encode_flac,
        log_mel,
        process_audio,
        resample,
    )
    from mmdata.transforms.audio_window import WindowedAudio, probe_header
except ImportError as _exc:  # soundfile, soxr, librosa, srt, webvtt-py: the 'audio' extra
    _MISSING: Optional[ImportError] = _exc
else:
    _MISSING = None


# A recording whose decoded samples (float32, all channels) would take more than this is decoded one
# segment window at a time (formats libsndfile seeks exactly); shorter ones are decoded once, whole.
WINDOWED_ABOVE_BYTES = 64 << 20
_HEAD_MARGIN_S = 1.0  # a clip is judged long from its header only past max_duration + this (resampler edges)


@dataclass(frozen=True)
class Transcript:
    url: str
    ext: str
    segments: list  # mmdata.sources.transcripts.Segment, in transcript order


def looks_like_transcript(doc: Any) -> bool:
    """A Whisper object (``segments``) or a list of objects with times: a transcript, not metadata."""
    if isinstance(doc, dict):
        return "segments" in doc
    return (isinstance(doc, list) and bool(doc) and all(isinstance(x, dict) for x in doc)
            and any("start" in x or "end" in x for x in doc))


class AudioProcessor:
    """Decodes, cuts and encodes the audio of one configuration (built once per worker process)."""

    def __init__(self, config: BuildConfig):
        if _MISSING is not None:
            raise UserError(f"records with audio need the 'audio' extra (pip install 'mmdata[audio]'): {_MISSING}")
        self.config = config
        self.cfg = config.audio
        self.keep_audio = config.audio_encoder is not None
        self.require_audio = "audio" in config.require

    # ----------------------------------------------------------------------------- transcript

    def find_transcript(self, sample: Sample, json_data: Optional[bytes]) -> Optional[Transcript]:
        """The record's timed transcript, parsed (``SampleFailed`` when it cannot be), or None."""
        record, row = sample.record, sample.row
        url = record.sources.get("transcript")
        if url is not None:
            data = read_source(url, "transcript", self.config.max_sidecar_bytes, self.config.max_source_bytes)
            row["source_bytes"] += len(data)
        elif json_data is not None and _is_transcript_json(json_data):
            url, data = record.sources["json"], json_data
            row["source_json"] = None
        else:
            return None
        ext = posixpath.splitext(url)[1].lstrip(".").lower()
        row["source_transcript"] = url
        if ext in ("srt", "vtt"):  # in any encoding (a .json is UTF-8 or UTF-16 by its standard)
            try:
                data, warnings = decode_text(data)
            except SampleFailed as err:
                raise SampleFailed("decode:transcript", err.detail) from None
            row["warnings"] += warnings
        return Transcript(url, ext, parse_transcript(data, ext))

    # ---------------------------------------------------------------------------------- audio

    def read(self, sample: Sample, timer: Timer) -> bytes:
        """The record's audio bytes (undecoded); source facts go into the row."""
        url, row = sample.record.sources["audio"], sample.row
        t0 = time.perf_counter()
        got = sample.downloads.get(url)  # an http(s) source the unit downloaded (or the reason it has none)
        if got is not None and got.error is not None:
            raise got.error
        data = got.data if got is not None else read_source(url, "audio", max_source_bytes=self.config.max_source_bytes)
        timer.add("read", t0)
        row["source_bytes"] += len(data)
        row["audio_sha256"] = hashlib.sha256(data).hexdigest()
        return data

    def _header_facts(self, sample: Sample, data: bytes, header: dict) -> None:
        row, url = sample.row, sample.record.sources["audio"]
        row.update(audio_container=header["container"], source_sample_rate=header["sample_rate"],
                   source_channels=header["channels"], source_duration=header["duration"])
        ext = posixpath.splitext(url)[1].lower().lstrip(".")
        allowed = _EXT_CONTAINERS.get(ext)
        if allowed is not None and header["container"] not in allowed:
            row["warnings"].append(f"ext_mismatch:audio:{header['container']}")

    def decode(self, sample: Sample, timer: Timer, data: Optional[bytes] = None,
               max_frames: Optional[int] = None) -> tuple[np.ndarray, int]:
        """Read (unless ``data`` is given) and decode the record's audio (its head of ``max_frames``
        where the decoder allows); source facts go into the row."""
        url, row = sample.record.sources["audio"], sample.row
        if data is None:
            data = self.read(sample, timer)
        t0 = time.perf_counter()
        try:
            samples, sr, info = decode_audio(data, posixpath.splitext(url)[1], max_frames=max_frames)
        finally:
            timer.add("audio_decode", t0)
        row.update(audio_container=info["container"], source_sample_rate=sr, source_channels=info["channels"],
                   source_duration=info["duration"])
        if info["ext_mismatch"]:
            row["warnings"].append(f"ext_mismatch:audio:{info['container']}")
        return samples, sr

    def clip(self, sample: Sample, timer: Timer) -> None:
        """A whole file as one clip. A clip the policy filters drops the audio (warning
        ``audio_dropped:<reason>``) unless audio is required. A clip whose header says it is over
        ``max_duration`` (with ``trim_silence`` off, so the length is known before decoding) is
        filtered without decoding, or only its head is decoded (``long_clips="cut"``)."""
        cfg = self.cfg
        data = self.read(sample, timer)
        header = probe_header(data) if cfg.max_duration is not None and not cfg.trim_silence else None
        max_frames = None
        t0 = time.perf_counter()
        try:
            if header is not None and header["duration"] > cfg.max_duration + _HEAD_MARGIN_S:
                if cfg.long_clips == "filter":
                    self._header_facts(sample, data, header)
                    raise SampleFiltered("duration:too_long", f"{header['duration']:.3f} s > {cfg.max_duration} s "
                                                              "(from the header, not decoded)")
                max_frames = int(np.ceil((cfg.max_duration + _HEAD_MARGIN_S) * header["sample_rate"]))
            samples, sr = self.decode(sample, timer, data, max_frames)
            if max_frames is not None:
                sample.row["source_duration"] = header["duration"]
            t0 = time.perf_counter()  # decode time is counted apart (audio_decode)
            y, info = process_audio(samples, sr, self.cfg)
        except SampleFiltered as err:
            if self.require_audio:
                raise
            sample.row["warnings"].append(f"audio_dropped:{err.reason}")
            return
        finally:
            timer.add("audio", t0)
        self._store(sample, y, info["sample_rate"], info.get("trimmed", [0.0])[0], timer)

    def _store(self, sample: Sample, y: np.ndarray, sr: int, clip_start: float, timer: Timer) -> None:
        """The ``flac`` (and ``mel.npy``) members and the output facts of processed audio ``y``."""
        duration = len(y) / sr
        t0 = time.perf_counter()
        flac = encode_flac(y, sr)
        timer.add("flac", t0)
        sample.members["flac"] = flac
        sample.row.update(sample_rate=sr, channels=1 if y.ndim == 1 else int(y.shape[1]), duration=duration,
                          clip_start=clip_start, clip_end=clip_start + duration, audio_bytes=len(flac))
        if self.cfg.mel:
            t0 = time.perf_counter()
            sample.members["mel.npy"] = npy_bytes(log_mel(y, sr, self.cfg))
            timer.add("mel", t0)
        if self.keep_audio:
            sample.audio = (y, sr)

    # ------------------------------------------------------------------------------- segments

    def segments(self, parent: Sample, transcript: Transcript, timer: Timer) -> list[Sample]:
        """One sample per planned segment (written or filtered with its reason), in key order.
        A recording that cannot be decoded raises, and stays one failed row."""
        cfg, conf = self.cfg, self.config
        data = self.read(parent, timer)
        header = probe_header(data)
        if header is not None and header["frames"] * header["channels"] * 4 > WINDOWED_ABOVE_BYTES:
            # a long recording: decoded one segment window at a time, never whole
            self._header_facts(parent, data, header)
            out_sr = cfg.sample_rate or header["sample_rate"]
            x = WindowedAudio(data, header, cfg.mono, out_sr, cfg.resample_quality)
            t0 = time.perf_counter()
            plan = plan_segments(transcript.segments, len(x) / out_sr, offset=conf.segment_offset,
                                 pad=conf.segment_pad, min_segment=conf.min_segment, max_segment=conf.max_segment,
                                 max_merge_gap=conf.max_merge_gap, samples=x, sample_rate=out_sr)
            timer.add("audio", t0)
            return [self._segment(parent, p, x, out_sr, timer) for p in plan]
        samples, sr = self.decode(parent, timer, data)
        t0 = time.perf_counter()
        x = downmix(samples) if cfg.mono else samples
        del samples
        out_sr = cfg.sample_rate or sr
        x = resample(x, sr, out_sr, cfg.resample_quality)
        plan = plan_segments(transcript.segments, len(x) / out_sr, offset=conf.segment_offset, pad=conf.segment_pad,
                             min_segment=conf.min_segment, max_segment=conf.max_segment,
                             max_merge_gap=conf.max_merge_gap, samples=x, sample_rate=out_sr)
        timer.add("audio", t0)
        return [self._segment(parent, p, x, out_sr, timer) for p in plan]

    def _segment(self, parent: Sample, p: "PlannedSegment", x: np.ndarray, sr: int, timer: Timer) -> Sample:
        record, conf = parent.record, self.config
        key = sanitize_key(p.key(record.key))  # ≤ 128 characters (a hash suffix when longer)
        row = {**parent.row, "key": key, "id": key_to_id(key), "parent_key": record.key,
               "warnings": list(parent.row["warnings"]), "segment_index": p.index, "segment_part": p.part,
               "start": p.start, "end": p.end}
        doc = {**parent.doc, "source": record.sources["audio"], "transcript": row["source_transcript"],
               "pad": conf.segment_pad, "offset": conf.segment_offset, "segment_indices": list(p.indices)}
        if not p.text_exact:
            doc["text_exact"] = False  # split without word timings: the text was shared out by time
        child = Sample(record, row, members={k: v for k, v in parent.members.items() if k != "json"},
                       image=parent.image, meta=parent.meta, doc=doc)
        caption, warnings = clean_caption(p.text, conf.max_caption_chars)
        row["caption"] = caption or None
        try:
            if not p.ok:
                raise SampleFiltered(p.reason, p.detail)
            row["warnings"] += warnings
            if len(caption) < max(conf.min_caption_chars, 1):
                raise SampleFiltered("empty:text", f"{len(caption)} characters after cleaning")
            t0 = time.perf_counter()
            i0 = min(len(x), max(0, int(round(p.cut_start * sr))))
            try:
                y, info = process_audio(cut(x, sr, p.cut_start, p.cut_end), sr, self.cfg)
            finally:
                timer.add("audio", t0)
            child.caption = caption
            child.members["txt"] = caption.encode("utf-8")
            self._store(child, y, sr, i0 / sr + info.get("trimmed", [0.0])[0], timer)
            write_json(child)
        except Exception as exc:  # noqa: BLE001 — this segment's problem stays in its row
            child.caption = None
            return mark_not_written(child, as_sample_error(exc))
        row.update(status="written", reason=None)
        return child


def _is_transcript_json(data: bytes) -> bool:
    try:
        return looks_like_transcript(json.loads(data.decode("utf-8-sig")))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False  # not JSON at all (or nested too deep): the metadata step reports decode:json

