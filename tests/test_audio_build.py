"""Audio through `mmdata build`: timed transcripts (srt, vtt, Whisper json) split real synthesised
speech into one sample per segment; odd rates, channel counts and formats; broken files and a
broken transcript accounted for; image + caption + sound read back by webdataset with audio
embeddings; byte-identical output whatever the worker count."""
import glob
import io
import json
import os
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import webdataset as wds
from conftest import run_build
from PIL import Image
from typer.testing import CliRunner

from mmdata.cli.main import app
from mmdata.tools.verify import verify_output

SENTENCES = ["The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
             "It is easy to tell the depth of a well.", "These days a chicken leg is a rare dish."]
GAPS = [0.35, 0.3, 0.5, 0.25, 0.4]  # silence before each sentence and after the last
PAD = 0.05
# (name, rate, channels, soundfile format/subtype or "ffmpeg"): the odd inputs, each with a caption
CLIPS = [("rate_08000.wav", 8000, 1, ("WAV", "PCM_16")), ("rate_11025.flac", 11025, 2, ("FLAC", "PCM_16")),
         ("rate_22050.ogg", 22050, 1, ("OGG", "VORBIS")), ("rate_44100.m4a", 44100, 2, "ffmpeg"),
         ("rate_48000.mp3", 48000, 2, ("MP3", "MPEG_LAYER_III")), ("rate_96000.wav", 96000, 6, ("WAV", "PCM_24"))]
EXPECTED_REASONS = {
    "failed": {"decode:audio": 1, "decode:transcript": 1, "empty:audio": 2, "nonfinite:audio": 1, "truncated:audio": 1},
    "filtered": {"missing:audio": 1, "segment:empty_text": 1, "segment:outside_audio": 1},
}


def needs(tool, package):
    if not shutil.which(tool):
        pytest.skip(f"needs {tool} (apt-get install {package})")


def tone(sr, channels, seconds=1.0, freq=440.0):
    t = np.arange(int(sr * seconds)) / sr
    return np.stack([0.3 * np.sin(2 * np.pi * freq * (1 + c / 4) * t) for c in range(channels)], axis=1).astype(np.float32)


def fmt_time(t, sep):
    ms = int(round(t * 1000))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def transcripts(times, duration):
    """The recording's times in srt (plus a cue past the end), vtt, and Whisper json (plus an empty segment)."""
    cues = [(s, e, text) for (s, e), text in zip(times, SENTENCES)]
    srt = "\n".join(f"{i + 1}\n{fmt_time(s, ',')} --> {fmt_time(e, ',')}\n{text}\n"
                    for i, (s, e, text) in enumerate(cues + [(duration + 2, duration + 3, "Past the end.")]))
    vtt = "WEBVTT\n\n" + "\n".join(f"{fmt_time(s, '.')} --> {fmt_time(e, '.')}\n{text}\n" for s, e, text in cues)
    whisper = {"text": " ".join(SENTENCES), "language": "en", "segments": [
        {"id": i, "start": round(s, 3), "end": round(e, 3), "text": " " + text} for i, (s, e, text) in enumerate(cues)]
        + [{"id": 4, "start": round(duration - 0.2, 3), "end": round(duration - 0.1, 3), "text": "  "}]}
    return srt, vtt, json.dumps(whisper)


@pytest.fixture(scope="module")
def speech_corpus(tmp_path_factory):
    """Speech synthesised sentence by sentence (so the true times are known) with its transcript in
    three formats; clips at odd rates, channel counts and formats; broken files; a broken transcript."""
    needs("espeak-ng", "espeak-ng")
    needs("ffmpeg", "ffmpeg")
    root = tmp_path_factory.mktemp("speech_corpus")
    tmp = tmp_path_factory.mktemp("speech_parts")
    parts, times, pos, sr = [], [], 0, None
    for i, sentence in enumerate(SENTENCES):
        subprocess.run(["espeak-ng", "-w", str(tmp / f"s{i}.wav"), sentence], check=True)
        x, sr = sf.read(tmp / f"s{i}.wav", dtype="float32")
        parts += [np.zeros(int(GAPS[i] * sr), np.float32), x]
        pos += len(parts[-2])
        times.append((pos / sr, (pos + len(x)) / sr))
        pos += len(x)
    recording = np.concatenate(parts + [np.zeros(int(GAPS[-1] * sr), np.float32)])
    duration = len(recording) / sr
    srt, vtt, whisper = transcripts(times, duration)
    sf.write(root / "talk_srt.wav", recording, sr, subtype="PCM_16")
    (root / "talk_srt.srt").write_text(srt)
    sf.write(root / "talk_vtt.flac", recording, sr, subtype="PCM_16")
    (root / "talk_vtt.vtt").write_text(vtt)
    sf.write(root / "talk_whisper.wav", recording, sr, subtype="PCM_16")
    (root / "talk_whisper.json").write_text(whisper)
    for name, rate, channels, fmt in CLIPS:
        if fmt == "ffmpeg":
            sf.write(tmp / "src.wav", tone(rate, channels), rate, subtype="PCM_16")
            subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(tmp / "src.wav"), "-c:a", "aac",
                            str(root / name)], check=True)
        else:
            sf.write(root / name, tone(rate, channels), rate, format=fmt[0], subtype=fmt[1])
        (root / name).with_suffix(".txt").write_text(f"a {rate} Hz tone on {channels} channels")
    (root / "rate_08000.json").write_text(json.dumps({"license": "cc0"}))  # metadata, not a transcript
    sf.write(tmp / "whole.wav", tone(16000, 1), 16000, subtype="PCM_16")
    whole = (tmp / "whole.wav").read_bytes()
    nan = tone(16000, 1)
    nan[100] = np.nan
    sf.write(root / "bad_nan.wav", nan, 16000, subtype="FLOAT")
    (root / "bad_truncated.wav").write_bytes(whole[: len(whole) // 2])
    (root / "bad_zero.wav").write_bytes(b"")
    sf.write(root / "bad_header_only.wav", np.zeros((0, 1), np.float32), 16000, subtype="PCM_16")
    (root / "bad_text.wav").write_text("this is a text file, not a recording\n" * 4)
    sf.write(root / "bad_transcript.wav", recording, sr, subtype="PCM_16")
    (root / "bad_transcript.srt").write_text("this is not a subtitle file")
    for stem in ("bad_nan", "bad_truncated", "bad_zero", "bad_header_only", "bad_text", "only_text"):
        (root / f"{stem}.txt").write_text(f"caption of {stem}")
    return str(root), times, duration


def build_cli(corpus, out, workers):
    args = ["build", "--input", corpus, "--out", str(out), "--require", "audio,text", "--segment-pad", str(PAD),
            "--mel", "--audio-encoder", "mel-stats", "--no-index", "--samples-per-shard", "5",
            "--workers", str(workers), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.load(open(os.path.join(out, "manifest.json")))


@pytest.fixture(scope="module")
def speech_built(speech_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("speech_out")
    return str(out), build_cli(speech_corpus[0], out, workers=2)


def table(out):
    return [r for f in sorted(glob.glob(f"{out}/shards/*.parquet")) for r in pq.read_table(f).to_pylist()]


def samples(out, *decode):
    urls = sorted(glob.glob(f"{out}/shards/*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False).decode(*decode))


def test_counts_reconcile_with_a_reason_for_every_row(speech_built):
    out, manifest = speech_built
    c, rows = manifest["counts"], table(out)
    assert manifest["records"] == 3 + len(CLIPS) + 5 + 1 + 1
    assert c["inputs"] == len(rows) == c["written"] + c["filtered"] + c["failed"]
    assert c["written"] == 3 * len(SENTENCES) + len(CLIPS)
    assert manifest["reasons"] == EXPECTED_REASONS
    for r in rows:
        assert (r["status"] == "written") == (r["reason"] is None), r
    by_key = {r["key"]: r for r in rows}
    assert by_key["bad_transcript"]["reason"] == "decode:transcript" and by_key["bad_transcript"]["parent_key"] is None
    assert by_key["bad_truncated"]["reason"] == "truncated:audio"
    assert by_key["talk_srt_s0004"]["reason"] == "segment:outside_audio"
    assert by_key["talk_whisper_s0004"]["reason"] == "segment:empty_text"
    assert verify_output(out) == []


@pytest.mark.parametrize("stem", ["talk_srt", "talk_vtt", "talk_whisper"])
def test_segments_follow_the_transcript(speech_corpus, speech_built, stem):
    _, times, duration = speech_corpus
    out, _ = speech_built
    rows = {r["key"]: r for r in table(out) if r["parent_key"] == stem}
    got = {s["__key__"]: s for s in samples(out) if s["__key__"].startswith(stem + "_s")}
    keys = [f"{stem}_s{i:04d}" for i in range(len(SENTENCES))]
    assert sorted(got) == keys
    for key, (start, end), text in zip(keys, times, SENTENCES):
        row, sample = rows[key], got[key]
        audio, sr = sf.read(io.BytesIO(sample["flac"]), dtype="float32")
        assert sr == 16000 and audio.ndim == 1 and sf.info(io.BytesIO(sample["flac"])).subtype == "PCM_16"
        expected = min(end + PAD, duration) - max(start - PAD, 0.0)
        assert abs(len(audio) / sr - expected) <= 0.020, (key, len(audio) / sr, expected)
        assert np.sqrt(np.mean(audio ** 2)) > 0.01  # speech, not the silence between sentences
        assert sample["txt"] == text == row["caption"]
        meta = sample["json"]
        assert abs(meta["start"] - start) <= 0.001 and abs(meta["end"] - end) <= 0.001
        assert (row["start"], row["end"]) == (meta["start"], meta["end"])
        assert meta["pad"] == PAD and meta["source"].endswith(stem + (".flac" if stem == "talk_vtt" else ".wav"))
        assert row["duration"] == len(audio) / sr and row["sample_rate"] == 16000
        assert sample["mel.npy"].dtype == np.float16 and sample["mel.npy"].shape[0] == 80


def test_odd_rates_channels_and_formats(speech_built):
    out, manifest = speech_built
    rows = {r["key"]: r for r in table(out)}
    got = {s["__key__"]: s for s in samples(out) if s["__key__"].startswith("rate_")}
    assert len(got) == len(CLIPS)
    for name, rate, channels, fmt in CLIPS:
        key = name.split(".")[0]
        row = rows[key]
        assert (row["source_sample_rate"], row["source_channels"]) == (rate, channels), row
        audio, sr = sf.read(io.BytesIO(got[key]["flac"]), dtype="float32")
        assert sr == 16000 and audio.ndim == 1
        assert abs(len(audio) / sr - 1.0) <= (0.002 if fmt[0] in ("WAV", "FLAC", "OGG") else 0.06), (name, len(audio) / sr)
        assert got[key]["txt"] == f"a {rate} Hz tone on {channels} channels"
    assert got["rate_08000"]["json"]["meta"] == {"license": "cc0"}
    assert manifest["audio"]["mel"]["n_mels"] == 80 and manifest["audio"]["mel"]["sample_rate"] == 16000


def test_audio_embeddings_align_with_written_rows(speech_built):
    out, manifest = speech_built
    assert manifest["embeddings"]["modalities"] == ["audio"] and manifest["embeddings"]["audio_encoder"]["name"] == "mel-stats"
    for f in sorted(glob.glob(f"{out}/shards/*.parquet")):
        written = [r for r in pq.read_table(f).to_pylist() if r["status"] == "written"]
        emb = np.load(f"{out}/embeddings/audio/{os.path.basename(f)[:-8]}.npy")
        assert emb.shape == (len(written), manifest["embeddings"]["audio_dim"])
        assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=1e-2)


def test_keep_channels(speech_corpus, tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    for name in ("rate_11025.flac", "rate_96000.wav"):
        shutil.copy(os.path.join(speech_corpus[0], name), corpus / name)
    run_build(corpus, tmp_path / "out", require=["audio"], mono=False, sample_rate=22050, workers=1)
    channels = {r["key"]: r["channels"] for r in table(tmp_path / "out")}
    assert channels == {"rate_11025": 2, "rate_96000": 6}
    for s in samples(tmp_path / "out"):
        audio, sr = sf.read(io.BytesIO(s["flac"]))
        assert sr == 22050 and audio.shape[1] == channels[s["__key__"]]


def test_deterministic_across_worker_counts(speech_corpus, speech_built, tmp_path):
    out, _ = speech_built
    build_cli(speech_corpus[0], tmp_path / "one", workers=1)
    files = sorted(os.path.relpath(p, out) for p in glob.glob(f"{out}/**/*.*", recursive=True)
                   if p.endswith((".tar", ".parquet", ".npy")) or p.endswith("sizes.json"))
    assert any(f.startswith("embeddings/audio/") for f in files) and len(files) >= 9
    for rel in files:
        assert open(os.path.join(out, rel), "rb").read() == open(tmp_path / "one" / rel, "rb").read(), rel


# ------------------------------------------------------------------------ image + caption + sound


def index_ready() -> bool:
    import mmdata.index

    return hasattr(mmdata.index, "build_index")


def test_image_caption_and_optional_sound(tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(corpus / f"pic_{i}.jpg")
        (corpus / f"pic_{i}.txt").write_text(f"picture {i} with a sound")
        if i < 3:  # the sound effect is optional: pic_3 has none
            noise = 0.1 * rng.standard_normal((24000, 1)).astype(np.float32) + tone(24000, 1, freq=200 * (i + 1))
            sf.write(corpus / f"pic_{i}.wav", noise, 24000, subtype="PCM_16")
    manifest = run_build(corpus, tmp_path / "out", image_size=64, audio_encoder="mel-stats", workers=1,
                         index=index_ready())
    out = tmp_path / "out"
    assert manifest["counts"] == {"inputs": 4, "written": 4, "filtered": 0, "failed": 0}
    got = {s["__key__"]: s for s in samples(out, "pil")}
    for i in range(3):
        s = got[f"pic_{i}"]
        assert {"jpg", "txt", "flac", "json"} <= set(s) and s["jpg"].size[1] == 64
        assert sf.info(io.BytesIO(s["flac"])).samplerate == 16000
    assert "flac" not in got["pic_3"] and "jpg" in got["pic_3"]
    # open_clip's audio convention: (flac, txt) pairs
    ds = wds.WebDataset(sorted(glob.glob(f"{out}/shards/*.tar")), shardshuffle=False)
    pairs = list(ds.select(lambda s: "flac" in s).to_tuple("flac", "txt"))
    assert len(pairs) == 3 and all(isinstance(a, bytes) and t.startswith(b"picture") for a, t in pairs)
    emb = np.load(f"{out}/embeddings/audio/00000.npy").astype(np.float32)
    written = [r["key"] for r in table(out) if r["status"] == "written"]
    assert written == [f"pic_{i}" for i in range(4)] and emb.shape[0] == 4
    assert np.allclose(np.linalg.norm(emb[:3], axis=1), 1.0, atol=1e-2) and not emb[3].any()
    assert verify_output(str(out)) == []
    if index_ready():
        assert os.path.exists(f"{out}/index/audio.index") and manifest["index"]["audio"]["n"] == 3


def test_clap_embeddings_and_the_encoder_a_retriever_recreates(tmp_path):
    """A tiny random CLAP saved to disk, through the build; the manifest's facts re-create it."""
    pytest.importorskip("transformers")
    from test_audio_encoders import write_tiny_clap

    from mmdata.encoders.factory import audio_encoder_from_facts

    folder = tmp_path / "clap"
    folder.mkdir()
    corpus = tmp_path / "in"
    corpus.mkdir()
    for i, freq in enumerate((220, 880, 3000)):
        sf.write(corpus / f"beep_{i}.wav", tone(32000, 1, freq=freq), 32000, subtype="PCM_16")
        (corpus / f"beep_{i}.txt").write_text(f"a beep at {freq} Hz")
    manifest = run_build(corpus, tmp_path / "out", require=["audio", "text"], audio_encoder="clap",
                         clap_model=write_tiny_clap(folder), device="cpu", index=False, workers=1)
    facts = manifest["embeddings"]["audio_encoder"]
    assert facts["name"] == "clap" and facts["dim"] == manifest["embeddings"]["audio_dim"] == 16
    emb = np.load(tmp_path / "out" / "embeddings" / "audio" / "00000.npy").astype(np.float32)
    assert emb.shape == (3, 16)
    encoder = audio_encoder_from_facts(facts, device="cpu")
    stored = [sf.read(io.BytesIO(s["flac"]), dtype="float32") for s in samples(tmp_path / "out")]
    again = encoder.encode_audio(stored)
    assert np.all(np.sum(again * emb, axis=1) > 0.99)  # the flac's 16-bit rounding and float16 rows aside


def test_audio_options_from_yaml_and_flags(tmp_path):
    from mmdata.config import load_config
    from mmdata.errors import UserError

    path = tmp_path / "build.yaml"
    path.write_text("require: [audio, text]\naudio:\n  sample-rate: 22050\n  mel: true\n  n_mels: 64\nsegment_pad: 0.25\n")
    cfg = load_config(str(path), input="in", out="out", mono=False, max_duration=30.0)
    assert (cfg.audio.sample_rate, cfg.audio.mel, cfg.audio.n_mels, cfg.audio.mono) == (22050, True, 64, False)
    assert cfg.audio.max_duration == 30.0 and cfg.segment_pad == 0.25
    assert load_config(str(path), input="in", out="out", sample_rate=48000).audio.sample_rate == 48000  # flag wins
    assert load_config(input="in", out="out", audio_encoder="mel-stats").embedded_modalities == ["audio"]
    for bad, field in [({"sample_rate": 5}, "audio.sample_rate"), ({"normalize": "loud"}, "audio.normalize"),
                       ({"segment_pad": -1}, "segment_pad"), ({"audio_encoder": "wav2vec"}, "audio_encoder"),
                       ({"min_segment": 5, "max_segment": 1}, "max_segment")]:
        with pytest.raises(UserError, match=field):
            load_config(input="in", out="out", **bad)


def test_a_segment_key_that_meets_a_record_key_gets_a_suffix(tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    sf.write(corpus / "cat.wav", tone(16000, 1, seconds=2.0), 16000, subtype="PCM_16")
    (corpus / "cat.srt").write_text("1\n00:00:00,100 --> 00:00:00,900\nmeow\n\n2\n00:00:01,000 --> 00:00:01,900\npurr\n")
    sf.write(corpus / "cat_s0000.wav", tone(16000, 1), 16000, subtype="PCM_16")  # literally named like a segment
    (corpus / "cat_s0000.txt").write_text("another cat")
    manifest = run_build(corpus, tmp_path / "out", require=["audio", "text"], workers=1)
    keys = [s["__key__"] for s in samples(tmp_path / "out")]
    assert manifest["counts"]["written"] == 3 and len(set(keys)) == 3 and keys == sorted(keys)
    assert "cat_s0000" in keys and "cat_s0001" in keys
    renamed = [k for k in keys if k.startswith("cat_s0000_")]
    assert len(renamed) == 1 and {r["parent_key"] for r in table(tmp_path / "out") if r["key"] == renamed[0]} == {"cat"}
    assert verify_output(str(tmp_path / "out")) == []
