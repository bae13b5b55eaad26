"""Bounded memory per record (issue 11, audio): a long file's length comes from its header before any
decoding; a too-long clip is filtered undecoded or only its head decoded; a long recording with a
transcript is decoded one segment window at a time. Peak RSS is measured on a real build subprocess."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf


SR = 16000
HOURS = 10
GIB = 1 << 30
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_silent_flac(path: str, hours: float, sr: int = SR) -> None:
    """A silent mono FLAC written in 10-minute blocks (the test itself stays small in memory)."""
    block, left = np.zeros(sr * 600, np.float32), int(hours * 3600 * sr)
    with sf.SoundFile(path, "w", sr, 1, format="FLAC", subtype="PCM_16") as f:
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= len(block)


def write_srt(path: str, cues: int, every: float, length: float) -> None:
    def ts(t: float) -> str:
        ms = int(round(t * 1000))
        return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"
    with open(path, "w") as f:
        for i in range(cues):
            a = 1.0 + i * every
            f.write(f"{i + 1}\n{ts(a)} --> {ts(a + length)}\nsegment {i}\n\n")


@pytest.fixture(scope="module")
def long_flac(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("long") / "cat.flac")
    write_silent_flac(path, HOURS)
    assert os.path.getsize(path) < 8 << 20  # silence compresses to a few MB
    return path


def build_measured(inp: str, out: str, *args: str) -> tuple[subprocess.CompletedProcess, int]:
    """``mmdata build`` with one worker in a fresh interpreter; returns it and its peak RSS in bytes.
    The interpreter measures its children (the build and its worker), under a 4 GiB address-space
    cap so that a regression fails the test instead of exhausting the machine. Not its own maxrss:
    Linux carries the hiwater RSS of the process it was spawned from (here pytest) into it at exec."""
    code = ("import resource, subprocess, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
            "p = subprocess.run([sys.executable, '-m', 'mmdata', 'build', *sys.argv[1:]])\n"
            "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
            "print('PEAK_KIB', peak)\n"
            "sys.exit(p.returncode)\n")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, "-i", inp, "-o", out, "--workers", "1", "--no-progress",
                           "--require", "audio", *args], capture_output=True, text=True, env=env, timeout=300)
    peak = [int(line.split()[1]) * 1024 for line in proc.stdout.splitlines() if line.startswith("PEAK_KIB")]
    assert peak, proc.stdout + proc.stderr
    return proc, peak[0]


def rows(out: str) -> list[dict]:
    shards = os.path.join(out, "shards")
    return [r for name in sorted(os.listdir(shards)) if name.endswith(".parquet")
            for r in pq.read_table(os.path.join(shards, name)).to_pylist()]


def test_ten_hour_clip_over_max_duration_is_filtered_without_decoding(long_flac, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    os.symlink(long_flac, inp / "cat.flac")
    proc, peak = build_measured(str(inp), str(tmp_path / "out"), "--max-duration", "30")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert peak < GIB, f"peak RSS {peak / GIB:.2f} GiB"
    (row,) = rows(str(tmp_path / "out"))
    assert row["status"] == "filtered" and row["reason"] == "duration:too_long"
    assert row["source_duration"] == pytest.approx(HOURS * 3600)


def test_ten_hour_clip_cut_decodes_only_the_head(long_flac, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    os.symlink(long_flac, inp / "cat.flac")
    proc, peak = build_measured(str(inp), str(tmp_path / "out"), "--max-duration", "30", "--long-clips", "cut")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert peak < GIB, f"peak RSS {peak / GIB:.2f} GiB"
    (row,) = rows(str(tmp_path / "out"))
    assert row["status"] == "written", row
    assert row["duration"] == pytest.approx(30.0) and row["source_duration"] == pytest.approx(HOURS * 3600)


def test_ten_hour_recording_with_2000_cues_is_cut_with_bounded_memory(long_flac, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    os.symlink(long_flac, inp / "cat.flac")
    write_srt(str(inp / "cat.srt"), 2000, every=HOURS * 3600 / 2000, length=3.0)
    proc, peak = build_measured(str(inp), str(tmp_path / "out"), "--samples-per-shard", "100000")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert peak < GIB, f"peak RSS {peak / GIB:.2f} GiB"
    out = rows(str(tmp_path / "out"))
    assert len(out) == 2000 and all(r["status"] == "written" for r in out)
    last = max(out, key=lambda r: r["start"])
    assert last["start"] == pytest.approx(1.0 + 1999 * 18.0) and last["duration"] == pytest.approx(3.0)
    assert (tmp_path / "out" / "manifest.json").exists()  # the build finalised


def test_truncated_long_recording_fails_the_segments_past_the_cut(long_flac, tmp_path):
    """Half the bytes of the 10-hour FLAC: segments in the first hours are written, those past the cut
    fail with truncated:audio (never a short clip written silently), and the build goes on."""
    inp = tmp_path / "in"
    inp.mkdir()
    with open(long_flac, "rb") as fh:
        data = fh.read()
    (inp / "cat.flac").write_bytes(data[:len(data) // 2])
    write_srt(str(inp / "cat.srt"), 20, every=HOURS * 3600 / 20, length=3.0)
    proc, peak = build_measured(str(inp), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert peak < GIB
    out = sorted(rows(str(tmp_path / "out")), key=lambda r: r["start"])
    assert len(out) == 20
    status = [r["status"] for r in out]
    assert status[0] == "written" and status[-1] == "failed", status
    assert {r["reason"] for r in out if r["status"] == "failed"} == {"truncated:audio"}
    assert status == sorted(status, key=lambda s: s != "written")  # written ones all come before the cut


@pytest.mark.parametrize("sr,out_sr,channels,mono", [(16000, 16000, 1, True), (44100, 16000, 2, True),
                                                     (48000, 22050, 2, False), (8000, 16000, 1, True)])
def test_windows_match_the_whole_recording(sr, out_sr, channels, mono):
    """Every window equals the same range of the whole recording decoded, downmixed and resampled at
    once (to float rounding, far below a 16-bit step), at the start, middle and end."""
    from mmdata.transforms.audio import decode_audio, downmix, resample
    from mmdata.transforms.audio_window import WindowedAudio, probe_header

    rng = np.random.default_rng(sr + channels)
    x = (rng.standard_normal((sr * 12, channels)) * 0.2).astype(np.float32)
    bio = io.BytesIO()
    sf.write(bio, x, sr, format="FLAC", subtype="PCM_16")
    data = bio.getvalue()
    header = probe_header(data)
    assert header == {"container": "flac", "sample_rate": sr, "channels": channels, "frames": len(x),
                      "duration": len(x) / sr}
    whole, _, _ = decode_audio(data, "flac")
    ref = resample(downmix(whole) if mono else whole, sr, out_sr)
    w = WindowedAudio(data, header, mono, out_sr)
    assert len(w) == len(ref) and w.ndim == ref.ndim
    n = len(ref)
    for i0, i1 in [(0, 1000), (7, n // 3), (n // 2 - 1, n // 2 + 4801), (n - 2000, n), (n - 5, n + 100), (n, n)]:
        got, want = w[i0:i1], ref[i0:i1]
        assert got.shape == want.shape
        assert np.allclose(got, want, atol=1e-6, rtol=0)


def test_header_probe_refuses_what_it_cannot_trust():
    """No length from a header that does not declare one: the full decode path keeps handling it."""
    from mmdata.transforms.audio_window import probe_header

    assert probe_header(b"") is None
    assert probe_header(b"not audio at all, just text\n" * 10) is None
    x = np.zeros((1600, 1), np.float32)
    bio = io.BytesIO()
    sf.write(bio, x, 16000, format="WAV", subtype="PCM_16")
    wav = bytearray(bio.getvalue())
    assert probe_header(bytes(wav))["frames"] == 1600
    pos = wav.find(b"data")
    wav[pos + 4:pos + 8] = (0xFFFFFFFF).to_bytes(4, "little")  # a streamed WAV's placeholder size
    assert probe_header(bytes(wav)) is None
    bio = io.BytesIO()
    sf.write(bio, x, 16000, format="OGG", subtype="VORBIS")
    assert probe_header(bio.getvalue()) is None  # not seekable sample-accurately: decoded whole as today
    flac = io.BytesIO()
    sf.write(flac, x, 16000, format="FLAC", subtype="PCM_16")
    assert probe_header(flac.getvalue()[:40]) is None  # a cut-off header
