"""Timed transcripts: parsing srt/vtt/json, planning the cuts, and cutting real synthesised speech."""
import json
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from mmdata.errors import SampleFailed
from mmdata.sources.transcripts import Segment, Word, cut, parse_transcript, plan_segments
from mmdata.transforms.audio import AudioConfig, decode_audio, process_audio

SRT = """1
00:00:00,500 --> 00:00:02,250
Hello <i>there</i>,
general Kenobi.

2
00:00:03,000 --> 00:00:04,125
{\\an8}Second line
"""

VTT = """WEBVTT
Kind: captions

NOTE a comment block

intro
00:00:00.500 --> 00:00:02.250 align:start
<v Obi>Hello <b>there</b>,
general Kenobi.

00:03.000 --> 00:04.125
Second line
"""

WHISPER = {
    "text": " Hello there, general Kenobi. Second line",
    "language": "en",
    "segments": [
        {"id": 0, "seek": 0, "start": 0.5, "end": 2.25, "text": " Hello there, general Kenobi.",
         "words": [{"word": " Hello", "start": 0.5, "end": 0.9, "probability": 0.9},
                   {"word": " there,", "start": 0.9, "end": 1.3, "probability": 0.9}]},
        {"id": 1, "seek": 0, "start": 3.0, "end": 4.125, "text": " Second line"},
    ],
}
EXPECTED = [(0.5, 2.25, "Hello there, general Kenobi."), (3.0, 4.125, "Second line")]


def triples(segments):
    return [(s.start, s.end, s.text) for s in segments]


@pytest.mark.parametrize("ext,data", [
    ("srt", SRT), ("vtt", VTT), (".json", json.dumps(WHISPER)),
    ("json", json.dumps([{"start": 0.5, "end": 2.25, "text": "Hello there, general Kenobi."},
                         {"start": 3, "end": 4.125, "text": "Second line"}])),
    ("SRT", "\ufeff" + SRT), ("srt", SRT.encode("utf-16")), ("vtt", VTT.encode("utf-8")),
], ids=["srt", "vtt", "whisper", "json-list", "srt-bom-upper-ext", "srt-utf16", "vtt-bytes"])
def test_parse_formats(ext, data):
    segments = parse_transcript(data, ext)
    assert [s.index for s in segments] == [0, 1]
    assert triples(segments) == EXPECTED


def test_whisper_words_are_kept():
    seg = parse_transcript(json.dumps(WHISPER), "json")[0]
    assert seg.words == (Word(0.5, 0.9, "Hello"), Word(0.9, 1.3, "there,"))


@pytest.mark.parametrize("ext,data,reason", [
    ("srt", "this is not a subtitle file", "decode:transcript"),
    ("srt", "1\n00:00:01,000 --> 00:0x:02,000\nbad time\n", "decode:transcript"),
    ("vtt", "no header\n\n00:00.000 --> 00:01.000\nhi\n", "decode:transcript"),
    ("vtt", "WEBVTT\n\n00:00:xx --> 00:00:03.250\nhi\n", "decode:transcript"),
    ("json", "{not json", "decode:transcript"),
    ("json", json.dumps({"text": "no segments key"}), "decode:transcript"),
    ("json", json.dumps([{"start": 0, "text": "no end"}]), "decode:transcript"),
    ("json", json.dumps([{"start": "0", "end": 1, "text": "string time"}]), "decode:transcript"),
    ("json", json.dumps([{"start": 0, "end": 1, "text": 5}]), "decode:transcript"),
    ("srt", b"\xff\xfa\x00garbage\x80", "decode:transcript"),
    ("txt", "plain", "decode:transcript"),
    ("srt", "", "empty:transcript"),
    ("vtt", "WEBVTT\n", "empty:transcript"),
    ("json", "[]", "empty:transcript"),
], ids=["srt-garbage", "srt-bad-time", "vtt-no-header", "vtt-bad-time", "json-syntax", "json-shape",
        "json-missing-end", "json-string-time", "json-text-type", "not-utf8", "unsupported-ext",
        "srt-empty", "vtt-empty", "json-empty"])
def test_bad_transcripts_fail(ext, data, reason):
    with pytest.raises(SampleFailed) as e:
        parse_transcript(data, ext)
    assert e.value.reason == reason


# ------------------------------------------------------------------------------------- planning


def segs(*spec):
    return [Segment(i, s, e, t) for i, (s, e, t) in enumerate(spec)]


def test_plan_reasons_and_keys():
    plan = plan_segments(segs(
        (0.0, 1.0, "one"),
        (1.05, 2.0, "two, slight overlap-free gap"),
        (1.9, 2.5, "within overlap tolerance"),
        (2.0, 2.2, "overlaps by more than the tolerance"),
        (3.0, 3.5, "   "),
        (4.0, 3.9, "ends before it starts"),
        (9.5, 10.5, "past the end of the audio"),
        (5.0, 6.0, "fine"),
    ), audio_duration=10.0, overlap_tolerance=0.1)
    by_index = {p.index: p for p in plan}
    assert [p.index for p in plan] == list(range(8))
    assert [by_index[i].reason for i in range(8)] == [
        None, None, None, "segment:overlap", "segment:empty_text", "segment:bad_times", "segment:outside_audio", None]
    assert by_index[3].key("clip_a") == "clip_a_s0003"
    assert all(p.detail for p in plan if not p.ok)
    assert (by_index[7].cut_start, by_index[7].cut_end) == (5.0, 6.0)


def test_offset_pad_and_clipping():
    plan = plan_segments(segs((0.0, 1.0, "a"), (2.0, 3.0, "b"), (8.5, 9.9, "c")), 10.0, offset=0.05, pad=0.2)
    assert [t for p in plan for t in (p.start, p.end)] == pytest.approx([0.05, 1.05, 2.05, 3.05, 8.55, 9.95])
    assert [t for p in plan for t in (p.cut_start, p.cut_end)] == pytest.approx([0.0, 1.25, 1.85, 3.25, 8.35, 10.0])
    late = plan_segments(segs((9.0, 9.95, "x")), 10.0, offset=0.3)
    assert late[0].reason == "segment:outside_audio"


def test_merge_short_segments():
    plan = plan_segments(segs(
        (0.0, 0.4, "a"), (0.5, 0.9, "b"), (1.0, 2.5, "c"),   # a+b+c reach 2.5 s
        (3.0, 5.5, "d"),                                      # long enough alone
        (9.0, 9.3, "e"),                                      # short, 3.5 s from d: too far to merge
        (20.0, 23.0, "f"), (23.2, 23.5, "g"),                 # short tail joins its predecessor
    ), 30.0, min_segment=1.0, max_merge_gap=1.0)
    assert [(p.index, p.indices, p.text, p.reason) for p in plan] == [
        (0, (0, 1, 2), "a b c", None), (3, (3,), "d", None), (4, (4,), "e", "segment:too_short"),
        (5, (5, 6), "f g", None)]
    assert (plan[0].start, plan[0].end) == (0.0, 2.5) and plan[0].key("k") == "k_s0000"
    assert sorted(i for p in plan for i in p.indices) == list(range(7))  # every segment accounted for once


def test_merging_never_exceeds_max_segment():
    plan = plan_segments(segs((0.0, 0.5, "a"), (0.6, 3.0, "b"), (3.1, 3.5, "c")), 10.0, min_segment=1.0, max_segment=2.0)
    assert [(p.indices, p.reason) for p in plan] == [
        ((0,), "segment:too_short"), ((1,), "segment:too_long"), ((2,), "segment:too_short")]


def test_split_long_segment_at_the_widest_pause_between_words():
    words = (Word(0.0, 1.0, "alpha"), Word(1.1, 2.0, "beta"), Word(2.8, 3.5, "gamma"), Word(3.6, 4.0, "delta"))
    plan = plan_segments([Segment(0, 0.0, 4.0, "alpha beta gamma delta", words)], 5.0, max_segment=3.0)
    assert [(p.part, p.start, p.end, p.text, p.text_exact) for p in plan] == [
        (0, 0.0, 2.4, "alpha beta", True), (1, 2.4, 4.0, "gamma delta", True)]
    assert [p.key("k") for p in plan] == ["k_s0000_p00", "k_s0000_p01"]


def test_split_long_segment_needs_words_or_samples():
    plan = plan_segments(segs((0.0, 4.0, "one two three four")), 5.0, max_segment=3.0)
    assert plan[0].reason == "segment:too_long"
    sr = 1000
    x = np.full(5 * sr, 0.5, np.float32)
    x[1950:2050] = 0.0  # the quiet spot
    plan = plan_segments(segs((0.0, 4.0, "one two three four")), 5.0, max_segment=3.0, samples=x, sample_rate=sr)
    assert [p.part for p in plan] == [0, 1] and all(p.ok and not p.text_exact for p in plan)
    assert 1.95 <= plan[0].end <= 2.05 and plan[1].start == plan[0].end
    assert (plan[0].text, plan[1].text) == ("one two", "three four")


def test_cut_rounds_to_samples_and_clips():
    x = np.arange(100).reshape(50, 2)
    assert cut(x, 10, 0.14, 0.26).tolist() == x[1:3].tolist()
    assert len(cut(x, 10, -1.0, 99.0)) == 50 and len(cut(x, 10, 4.0, 3.0)) == 0


# ------------------------------------------------------------------------------ real speech

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Audio segments are cut from the transcript times.",
    "Every input is accounted for.",
    "This is the last sentence of the recording.",
]
GAPS = [0.4, 0.3, 0.55, 0.25, 0.6]  # silence before each sentence and after the last
SR = 22050


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """Sentences synthesised one by one and concatenated, so the true segment times are known."""
    if not shutil.which("espeak-ng"):
        pytest.skip("needs espeak-ng (apt-get install espeak-ng)")
    tmp = tmp_path_factory.mktemp("speech")
    parts, times, pos = [], [], 0
    for i, sentence in enumerate(SENTENCES):
        path = tmp / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(path), sentence], check=True)
        x, sr = sf.read(path, dtype="float32")
        assert sr == SR
        gap = np.zeros(int(GAPS[i] * SR), np.float32)
        parts += [gap, x]
        pos += len(gap)
        times.append((pos / SR, (pos + len(x)) / SR))
        pos += len(x)
    parts.append(np.zeros(int(GAPS[-1] * SR), np.float32))
    recording = np.concatenate(parts)
    wav = tmp / "recording.wav"
    sf.write(wav, recording, SR, subtype="PCM_16")
    sentences = [parts[2 * i + 1] for i in range(len(SENTENCES))]
    return wav.read_bytes(), sentences, times


def fmt_srt(t):
    ms = int(round(t * 1000))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def transcripts(times, shift=0.0):
    t = [(s - shift, e - shift, text) for (s, e), text in zip(times, SENTENCES)]
    srt = "\n".join(f"{i + 1}\n{fmt_srt(s)} --> {fmt_srt(e)}\n{text}\n" for i, (s, e, text) in enumerate(t))
    vtt = "WEBVTT\n\n" + "\n".join(f"{fmt_srt(s).replace(',', '.')} --> {fmt_srt(e).replace(',', '.')}\n{text}\n"
                                   for s, e, text in t)
    whisper = json.dumps({"text": " ".join(SENTENCES), "segments": [
        {"id": i, "start": round(s, 3), "end": round(e, 3), "text": " " + text} for i, (s, e, text) in enumerate(t)]})
    return {"srt": srt, "vtt": vtt, "json": whisper}


def best_lag(a: np.ndarray, b: np.ndarray, max_lag: int) -> tuple[int, float]:
    """The shift of b against a (samples) with the highest normalised correlation, and that correlation."""
    best = (0, -1.0)
    for lag in range(-max_lag, max_lag + 1):
        x, y = (a[lag:], b) if lag >= 0 else (a, b[-lag:])
        n = min(len(x), len(y))
        x, y = x[:n], y[:n]
        corr = float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-12))
        best = max(best, (lag, corr), key=lambda t: t[1])
    return best


@pytest.mark.parametrize("ext", ["srt", "vtt", "json"])
def test_speech_segments_match_the_transcript(speech, ext):
    wav, sentences, times = speech
    shift = times[0][0]  # the transcript counts from the first word; the recording starts with silence
    segments = parse_transcript(transcripts(times, shift)[ext], ext)
    samples, sr, _ = decode_audio(wav, "wav")
    cfg = AudioConfig(sample_rate=16000)
    audio, info = process_audio(samples, sr, cfg)
    plan = plan_segments(segments, info["duration"], offset=shift)
    assert [p.reason for p in plan] == [None] * len(SENTENCES)
    assert [p.text for p in plan] == SENTENCES
    for p, sentence, (start, end) in zip(plan, sentences, times):
        clip = cut(audio, 16000, p.cut_start, p.cut_end)
        assert abs(len(clip) / 16000 - (end - start)) <= 0.020
        alone, _ = process_audio(sentence, SR, cfg)  # the same sentence, resampled on its own
        lag, corr = best_lag(clip, alone, max_lag=320)
        assert abs(lag) <= 320 and corr > 0.95  # the same sound, aligned within 20 ms


def test_speech_merge_pad_and_split_at_silence(speech):
    wav, sentences, times = speech
    samples, sr, _ = decode_audio(wav, "wav")
    audio, info = process_audio(samples, sr, AudioConfig(sample_rate=16000))
    segments = parse_transcript(transcripts(times)["json"], "json")
    longest = max(e - s for s, e in times)
    merged = plan_segments(segments, info["duration"], min_segment=longest + 0.01, pad=0.1)
    assert merged[0].indices == (0, 1) and merged[0].text == " ".join(SENTENCES[:2])
    clip = cut(audio, 16000, merged[0].cut_start, merged[0].cut_end)
    assert abs(len(clip) / 16000 - (times[1][1] - times[0][0] + 0.2)) <= 0.020
    # one segment spanning two sentences, longer than max_segment: split in the pause between them
    one = [Segment(0, times[0][0], times[1][1], " ".join(SENTENCES[:2]))]
    span = times[1][1] - times[0][0]
    plan = plan_segments(one, info["duration"], max_segment=span - 0.2, samples=audio, sample_rate=16000)
    assert [p.part for p in plan] == [0, 1] and all(p.ok for p in plan)
    point = plan[0].end
    around = cut(audio, 16000, point - 0.01, point + 0.01)
    assert np.sqrt(np.mean(around ** 2)) < 1e-3
    assert times[0][1] - 0.3 < point < times[1][0] + 0.3
