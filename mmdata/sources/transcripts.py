"""Timed transcripts (.srt, .vtt, .json) and how they cut a long recording into training segments.

``parse_transcript`` turns bytes into ``Segment``s in transcript order. ``plan_segments`` decides,
for every segment, either a cut window in the audio or a filter reason, so every segment of the
transcript is accounted for. ``cut`` takes the samples of one window.

Keys: a planned segment is named ``f"{key}_s{i:04d}"`` where ``i`` is the 0-based position in the
transcript of its (first) segment; segments merged into a neighbour take the first one's index,
the parts of a split segment add ``_p{j:02d}``. Keys therefore do not change when other segments
of the same transcript are filtered.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import numpy as np

from mmdata.errors import SampleFailed

_TAG = re.compile(r"</?[A-Za-z][^<>]*>|\{\\[^{}]*\}")  # <i>, </font ...>, ASS overrides {\an8}


@dataclass(frozen=True)
class Word:
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Segment:
    """One cue of a transcript: its 0-based position, times in seconds and text."""

    index: int
    start: float
    end: float
    text: str
    words: tuple[Word, ...] = ()  # word timings when the transcript has them (Whisper word_timestamps)


@dataclass(frozen=True)
class PlannedSegment:
    """A transcript segment (or merged run / split part) with its fate: a cut window or a reason."""

    index: int  # transcript index of the first segment covered: the key suffix
    indices: tuple[int, ...]  # every transcript index covered, in time order
    start: float  # transcript time + offset, seconds in the audio
    end: float
    text: str
    cut_start: float = 0.0  # [start - pad, end + pad] clipped to the audio; 0, 0 when filtered
    cut_end: float = 0.0
    part: Optional[int] = None  # split part number, None when not split
    text_exact: bool = True  # False when a split without word timings shared the text out by time
    reason: Optional[str] = None  # None: keep; else segment:outside_audio|overlap|empty_text|...
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None

    def key(self, base: str) -> str:
        """The sample key: ``{base}_s0007`` or, for a split part, ``{base}_s0007_p01``."""
        suffix = f"_s{self.index:04d}" + (f"_p{self.part:02d}" if self.part is not None else "")
        return base + suffix


# ---------------------------------------------------------------------------------------- parse


def _clean(text: str) -> str:
    return " ".join(_TAG.sub("", text).split())


def _as_text(data: bytes | str) -> str:
    if isinstance(data, str):
        return data
    try:
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SampleFailed("decode:transcript", f"not UTF-8/UTF-16 text ({exc.reason} at byte {exc.start})") from None


def parse_srt(text: str) -> list[Segment]:
    import srt

    try:
        subs = list(srt.parse(text))
    except (srt.SRTParseError, ValueError) as exc:
        raise SampleFailed("decode:transcript", f"srt: {str(exc).splitlines()[0][:200]}") from None
    return [Segment(i, s.start.total_seconds(), s.end.total_seconds(), _clean(s.content)) for i, s in enumerate(subs)]


def parse_vtt(text: str) -> list[Segment]:
    import webvtt
    from webvtt.errors import MalformedCaptionError, MalformedFileError

    def seconds(ts) -> float:
        return ts.hours * 3600 + ts.minutes * 60 + ts.seconds + ts.milliseconds / 1000

    try:
        vtt = webvtt.WebVTT.from_string(text, strict=True)
    except (MalformedFileError, MalformedCaptionError, ValueError) as exc:
        raise SampleFailed("decode:transcript", f"vtt: {exc}") from None
    return [Segment(i, seconds(c.start_time), seconds(c.end_time), _clean(c.text)) for i, c in enumerate(vtt.captions)]


def _number(item: dict, name: str, where: str) -> float:
    value = item.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SampleFailed("decode:transcript", f"json: {where}: '{name}' must be a finite number, got {value!r}")
    return float(value)


def parse_json(text: str) -> list[Segment]:
    """A list of ``{start, end, text}`` or Whisper's ``{"text", "segments": [...]}`` (words kept)."""
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise SampleFailed("decode:transcript", f"json: {exc}") from None
    items = doc.get("segments") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise SampleFailed("decode:transcript", "json: expected a list of {start, end, text} or an object with 'segments'")
    out = []
    for i, item in enumerate(items):
        where = f"segment {i}"
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise SampleFailed("decode:transcript", f"json: {where} needs start, end and a text string")
        words = []
        if not isinstance(item.get("words") or [], list):
            raise SampleFailed("decode:transcript", f"json: {where}: 'words' must be a list, got {type(item['words']).__name__}")
        for j, w in enumerate(item.get("words") or []):
            wtext = w.get("word", w.get("text")) if isinstance(w, dict) else None
            if not isinstance(wtext, str):
                raise SampleFailed("decode:transcript", f"json: {where} word {j} has no text")
            words.append(Word(_number(w, "start", f"{where} word {j}"), _number(w, "end", f"{where} word {j}"), wtext.strip()))
        out.append(Segment(i, _number(item, "start", where), _number(item, "end", where), _clean(item["text"]), tuple(words)))
    return out


_PARSERS = {"srt": parse_srt, "vtt": parse_vtt, "json": parse_json}


def parse_transcript(data: bytes | str, ext: str) -> list[Segment]:
    """Parse a transcript by extension (srt, vtt, json) into segments in transcript order.

    Raises ``SampleFailed("decode:transcript")`` for undecodable or malformed files and
    ``SampleFailed("empty:transcript")`` for one without segments.
    """
    ext = ext.lower().lstrip(".")
    if ext not in _PARSERS:
        raise SampleFailed("decode:transcript", f"unsupported transcript format .{ext} (srt, vtt, json)")
    segments = _PARSERS[ext](_as_text(data))
    if not segments:
        raise SampleFailed("empty:transcript", f"no segments in the .{ext} file")
    return segments


# ----------------------------------------------------------------------------------------- plan


@dataclass
class _Group:
    segs: list[Segment] = field(default_factory=list)

    @property
    def start(self) -> float:
        return self.segs[0].start

    @property
    def end(self) -> float:
        return self.segs[-1].end


def _quietest_point(samples: np.ndarray, sr: int, lo: float, hi: float) -> Optional[float]:
    """Time (s) of the lowest-RMS 20 ms window between lo and hi, None when the range is empty."""
    x = samples if samples.ndim == 1 else samples.mean(axis=1)
    i0, i1 = max(0, int(lo * sr)), min(len(x), int(hi * sr))
    win, hop = max(1, int(0.02 * sr)), max(1, int(0.01 * sr))
    if i1 - i0 < win:
        return None
    frames = np.lib.stride_tricks.sliding_window_view(x[i0:i1], win)[::hop]
    rms = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
    return (i0 + int(np.argmin(rms)) * hop + win / 2) / sr


def _split_points(seg: Segment, min_segment: float, max_segment: float, samples, sr) -> Optional[list[float]]:
    """Cut times that split ``seg`` into parts of at most ``max_segment`` s, or None if impossible."""
    points, cur = [], seg.start
    while seg.end - cur > max_segment:
        lo, hi = cur + min(max_segment, max(min_segment, max_segment / 2)), cur + max_segment
        gaps = [((a.end + b.start) / 2, b.start - a.end) for a, b in zip(seg.words, seg.words[1:])]
        inside = [(g, t) for t, g in gaps if lo <= t <= hi]
        point = max(inside)[1] if inside else None  # widest pause between words, the later on ties
        if point is None and samples is not None:
            point = _quietest_point(samples, sr, lo, hi)
        if point is None or point <= cur:
            return None
        points.append(point)
        cur = point
    return points


def _split(seg: Segment, points: list[float]) -> list[tuple[float, float, str, bool]]:
    """(start, end, text, text_exact) per part: words by timing, else the text shared out by time."""
    bounds = [seg.start, *points, seg.end]
    parts = []
    if seg.words:
        for a, b in zip(bounds, bounds[1:]):
            words = [w.text for w in seg.words if a <= (w.start + w.end) / 2 < b or (b == seg.end and (w.start + w.end) / 2 >= b)]
            parts.append((a, b, " ".join(words), True))
        return parts
    tokens = seg.text.split()
    span = seg.end - seg.start
    for a, b in zip(bounds, bounds[1:]):
        words = [t for j, t in enumerate(tokens) if a <= seg.start + (j + 0.5) / len(tokens) * span < b]
        parts.append((a, b, " ".join(words), False))
    return parts


def plan_segments(
    segments: Sequence[Segment],
    audio_duration: float,
    *,
    offset: float = 0.0,
    pad: float = 0.0,
    min_segment: float = 0.0,
    max_segment: Optional[float] = None,
    max_merge_gap: float = 1.0,
    overlap_tolerance: float = 0.1,
    edge_tolerance: float = 0.1,
    samples: Optional[np.ndarray] = None,
    sample_rate: Optional[int] = None,
) -> list[PlannedSegment]:
    """Plan the cuts of one recording from its transcript; returns one entry per outcome, in key order.

    Times are ``transcript time + offset``. A segment is filtered with ``segment:empty_text``,
    ``segment:bad_times`` (ends at or before its start), ``segment:outside_audio`` (beyond the
    audio by more than ``edge_tolerance``), ``segment:overlap`` (starts more than
    ``overlap_tolerance`` before the previous kept segment ends; the earlier one is kept),
    ``segment:too_short`` (under ``min_segment`` with no neighbour within ``max_merge_gap`` to
    merge with) or ``segment:too_long`` (over ``max_segment`` with neither word timings nor
    ``samples`` to find a split point). Short segments are merged with the next (else the
    previous) kept segment; long ones are split at the widest pause between words or, given
    ``samples``, at the quietest 20 ms within the allowed range.

    Every transcript index appears in the ``indices`` of exactly one entry (the parts of a split
    segment share theirs), so a caller can account for every segment.
    """
    if max_segment is not None and max_segment < min_segment:
        raise ValueError("max_segment must be >= min_segment")
    if samples is not None and not sample_rate:
        raise ValueError("samples need sample_rate")
    out: list[PlannedSegment] = []

    def reject(seg: Segment, reason: str, detail: str) -> None:
        out.append(PlannedSegment(seg.index, (seg.index,), seg.start, seg.end, seg.text, reason=reason, detail=detail))

    shifted = [replace(s, start=s.start + offset, end=s.end + offset,
                       words=tuple(Word(w.start + offset, w.end + offset, w.text) for w in s.words)) for s in segments]
    kept: list[Segment] = []
    for seg in sorted(shifted, key=lambda s: (s.start, s.index)):
        if not seg.text.strip():
            reject(seg, "segment:empty_text", "no text")
        elif seg.end <= seg.start:
            reject(seg, "segment:bad_times", f"ends at {seg.end:.3f} s, not after its start {seg.start:.3f} s")
        elif seg.start < -edge_tolerance or seg.end > audio_duration + edge_tolerance:
            reject(seg, "segment:outside_audio", f"[{seg.start:.3f}, {seg.end:.3f}] s vs audio of {audio_duration:.3f} s")
        elif kept and seg.start < kept[-1].end - overlap_tolerance:
            reject(seg, "segment:overlap", f"starts {kept[-1].end - seg.start:.3f} s before segment {kept[-1].index} ends")
        else:
            kept.append(seg)

    groups: list[_Group] = []
    for seg in kept:
        last = groups[-1] if groups else None
        if (last is not None and last.end - last.start < min_segment and seg.start - last.end <= max_merge_gap
                and (max_segment is None or seg.end - last.start <= max_segment)):
            last.segs.append(seg)
        else:
            groups.append(_Group([seg]))
    if len(groups) > 1 and groups[-1].end - groups[-1].start < min_segment:  # a short tail joins its predecessor
        prev, tail = groups[-2], groups[-1]
        if tail.start - prev.end <= max_merge_gap and (max_segment is None or tail.end - prev.start <= max_segment):
            prev.segs.extend(groups.pop().segs)

    def window(start: float, end: float) -> tuple[float, float]:
        return max(0.0, start - pad), min(audio_duration, end + pad)

    for g in groups:
        first, indices = g.segs[0], tuple(s.index for s in g.segs)
        text = " ".join(s.text for s in g.segs)
        if g.end - g.start < min_segment:
            out.append(PlannedSegment(first.index, indices, g.start, g.end, text, reason="segment:too_short",
                                      detail=f"{g.end - g.start:.3f} s < {min_segment} s, no neighbour to merge with"))
        elif max_segment is None or g.end - g.start <= max_segment:
            out.append(PlannedSegment(first.index, indices, g.start, g.end, text, *window(g.start, g.end)))
        else:  # only a single segment can be too long: merging never exceeds max_segment
            points = _split_points(first, min_segment, max_segment, samples, sample_rate)
            if points is None:
                out.append(PlannedSegment(first.index, indices, g.start, g.end, text, reason="segment:too_long",
                                          detail=f"{g.end - g.start:.3f} s > {max_segment} s; no word timings or samples to split it"))
                continue
            for j, (a, b, part_text, exact) in enumerate(_split(first, points)):
                if part_text:
                    out.append(PlannedSegment(first.index, indices, a, b, part_text, *window(a, b), part=j, text_exact=exact))
                else:
                    out.append(PlannedSegment(first.index, indices, a, b, "", part=j, text_exact=exact,
                                              reason="segment:empty_text", detail="no words fall in this part"))
    out.sort(key=lambda p: (p.index, -1 if p.part is None else p.part))
    return out


def cut(samples: np.ndarray, sr: int, start: float, end: float) -> np.ndarray:
    """Samples ``[round(start * sr), round(end * sr))`` along the first axis, clipped to the clip (a view)."""
    n = len(samples)
    i0 = min(n, max(0, int(round(start * sr))))
    i1 = min(n, max(i0, int(round(end * sr))))
    return samples[i0:i1]
