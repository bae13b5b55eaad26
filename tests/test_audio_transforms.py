"""Audio decode and transforms: every container, odd rates and layouts, broken files, policies."""
import io
import os
import shutil
import struct
import subprocess

import numpy as np
import pytest
import soundfile as sf
from pydantic import ValidationError

from mmdata.errors import SampleFailed, SampleFiltered
from mmdata.transforms import audio as A
from mmdata.transforms.audio import AudioConfig, decode_audio, encode_flac, log_mel, mel_params, process_audio

FREQS = [440.0, 660.0, 550.0, 330.0, 770.0, 880.0]  # one tone per channel


def tone(sr: int, channels: int = 1, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(sr * seconds))) / sr
    return np.stack([amp * np.sin(2 * np.pi * FREQS[c] * t) for c in range(channels)], axis=1).astype(np.float32)


def sf_bytes(x: np.ndarray, sr: int, fmt: str, subtype=None) -> bytes:
    bio = io.BytesIO()
    sf.write(bio, x, sr, format=fmt, subtype=subtype)
    return bio.getvalue()


def needs_ffmpeg():
    if not (shutil.which("ffmpeg") and shutil.which("ffprobe")):
        pytest.skip("needs ffmpeg (apt-get install ffmpeg)")


def ffmpeg_bytes(x: np.ndarray, sr: int, suffix: str, tmp_path, *args: str) -> bytes:
    needs_ffmpeg()
    src, dst = tmp_path / "src.wav", tmp_path / f"out{suffix}"
    sf.write(src, x, sr, subtype="PCM_16")
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(src), *args, str(dst)], check=True)
    return dst.read_bytes()


def peak_hz(x: np.ndarray, sr: int) -> float:
    x = x if x.ndim == 1 else x[:, 0]
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * sr / len(x))


def reasons(exc_info) -> str:
    return exc_info.value.reason


# ------------------------------------------------------------------------------------- decode

SOUNDFILE_CASES = [  # ext, format, subtype, rate, channels, lossless
    ("wav", "WAV", "PCM_16", 8000, 1, True),
    ("wav", "WAV", "FLOAT", 96000, 6, True),
    ("flac", "FLAC", "PCM_16", 44100, 2, True),
    ("flac", "FLAC", "PCM_24", 11025, 1, True),
    ("ogg", "OGG", "VORBIS", 22050, 2, False),
    ("opus", "OGG", "OPUS", 48000, 2, False),
    ("mp3", "MP3", "MPEG_LAYER_III", 44100, 2, False),
    ("aiff", "AIFF", "PCM_16", 48000, 1, True),
]


@pytest.mark.parametrize("ext,fmt,subtype,sr,channels,lossless", SOUNDFILE_CASES,
                         ids=[f"{c[0]}-{c[2]}-{c[3]}-{c[4]}ch" for c in SOUNDFILE_CASES])
def test_decode_soundfile_formats(ext, fmt, subtype, sr, channels, lossless):
    x = tone(sr, channels)
    samples, rate, info = decode_audio(sf_bytes(x, sr, fmt, subtype), ext)
    assert samples.dtype == np.float32 and samples.shape[1] == channels and rate == sr
    assert info["decoder"] == "soundfile" and not info["ext_mismatch"]
    assert info["frames"] == len(samples) and info["duration"] == pytest.approx(len(samples) / sr)
    if lossless:
        assert len(samples) == len(x)
        np.testing.assert_allclose(samples, x, atol=1.5 / 32768)
    else:
        assert abs(len(samples) - len(x)) <= 2048
        assert peak_hz(samples[: len(x)], sr) == pytest.approx(FREQS[0], abs=3)


@pytest.mark.parametrize("suffix,args,sr,channels", [
    (".m4a", ["-c:a", "aac"], 44100, 2),
    (".m4a", ["-c:a", "aac"], 48000, 6),
    (".mp3", [], 22050, 1),
], ids=["m4a-stereo", "m4a-6ch", "mp3-ffmpeg"])
def test_decode_ffmpeg_made_files(tmp_path, suffix, args, sr, channels):
    x = tone(sr, channels)
    data = ffmpeg_bytes(x, sr, suffix, tmp_path, *args)
    samples, rate, info = decode_audio(data, suffix)
    assert rate == sr and samples.shape[1] == channels
    assert abs(len(samples) - len(x)) <= 2048
    assert peak_hz(samples[: len(x)], sr) == pytest.approx(FREQS[0], abs=3)
    assert info["decoder"] == ("ffmpeg" if suffix == ".m4a" else "soundfile")


def test_streamed_flac_of_undeclared_length_goes_through_ffmpeg(tmp_path):
    needs_ffmpeg()
    src = tmp_path / "src.wav"
    sf.write(src, tone(22050, 2), 22050, subtype="PCM_16")
    piped = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(src), "-f", "flac", "pipe:1"],
                           check=True, capture_output=True).stdout
    samples, sr, info = decode_audio(piped, "flac")
    assert info["decoder"] == "ffmpeg" and info["declared_frames"] is None
    assert sr == 22050 and samples.shape == (22050, 2)
    np.testing.assert_allclose(samples, tone(22050, 2), atol=1.5 / 32768)
    with pytest.raises(SampleFailed) as e:  # no length to compare with, but ffmpeg reports the damage
        decode_audio(piped[: len(piped) // 2], "flac")
    assert reasons(e) == "decode:audio" and "ffmpeg" in e.value.detail


def test_m4a_without_ffmpeg_fails_naming_it(monkeypatch):
    data = b"\x00\x00\x00\x1cftypM4A \x00\x00\x02\x00M4A isommp42" + bytes(1000)  # an mp4 header
    monkeypatch.setattr(A.shutil, "which", lambda name: None)
    with pytest.raises(SampleFailed) as e:
        decode_audio(data, "m4a")
    assert reasons(e) == "decode:audio" and "ffmpeg" in e.value.detail and "not installed" in e.value.detail


def test_mp3_named_wav_decodes_by_content_and_records_the_mismatch():
    data = sf_bytes(tone(44100, 2), 44100, "MP3", "MPEG_LAYER_III")
    samples, sr, info = decode_audio(data, "wav")
    assert info["container"] == "mp3" and info["ext"] == "wav" and info["ext_mismatch"] is True
    assert sr == 44100 and samples.shape[1] == 2


@pytest.mark.parametrize("data,ext,reason", [
    (b"", "wav", "empty:audio"),
    (b"this is a caption, not a sound\n" * 20, "wav", "decode:audio"),
    (b"hello world\n", "flac", "decode:audio"),
    (bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)), "flac", "decode:audio"),
    (b"fLaC" + bytes(300), "flac", "decode:audio"),
], ids=["zero-bytes", "text-named-wav", "text-named-flac", "random-bytes", "flac-magic-garbage"])
def test_broken_bytes_fail_with_a_reason(data, ext, reason):
    with pytest.raises(SampleFailed) as e:
        decode_audio(data, ext)
    assert reasons(e) == reason


def test_header_only_wav_is_empty():
    header_only = sf_bytes(tone(16000), 16000, "WAV", "PCM_16")[:44]
    with pytest.raises(SampleFailed) as e:
        decode_audio(header_only, "wav")
    assert reasons(e) == "empty:audio"


def test_nan_samples_fail():
    x = tone(16000)
    x[100] = np.nan
    x[200] = np.inf
    with pytest.raises(SampleFailed) as e:
        decode_audio(sf_bytes(x, 16000, "WAV", "FLOAT"), "wav")
    assert reasons(e) == "nonfinite:audio" and "2 " in e.value.detail


@pytest.mark.parametrize("fmt,subtype,ext,sr", [
    ("WAV", "PCM_16", "wav", 22050), ("WAV", "FLOAT", "wav", 44100), ("FLAC", "PCM_16", "flac", 22050),
    ("FLAC", "PCM_24", "flac", 48000), ("AIFF", "PCM_16", "aiff", 22050), ("OGG", "VORBIS", "ogg", 22050),
    ("OGG", "OPUS", "opus", 48000), ("MP3", "MPEG_LAYER_III", "mp3", 44100),
])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_files_fail(fmt, subtype, ext, sr, keep):
    data = sf_bytes(tone(sr, 2, seconds=2.0), sr, fmt, subtype)
    with pytest.raises(SampleFailed) as e:
        decode_audio(data[: int(len(data) * keep)], ext)
    assert reasons(e) == "truncated:audio", e.value


def test_truncated_wav_at_a_frame_boundary_fails():
    data = sf_bytes(tone(16000, 2), 16000, "WAV", "PCM_16")
    with pytest.raises(SampleFailed) as e:
        decode_audio(data[: 44 + 4 * 1000], "wav")  # 1000 whole frames of the 16000 declared
    assert reasons(e) == "truncated:audio" and "1000 of 16000" in e.value.detail


@pytest.mark.parametrize("placeholder", [0xFFFFFFFF, 0x7FFFF000])
def test_streamed_wav_with_unknown_length_is_accepted(placeholder):
    data = bytearray(sf_bytes(tone(16000), 16000, "WAV", "PCM_16"))
    data[40:44] = struct.pack("<I", placeholder)  # what a pipe writer (ffmpeg, espeak-ng --stdout) leaves
    samples, _, info = decode_audio(bytes(data), "wav")
    assert len(samples) == 16000 and info["declared_frames"] is None


def test_truncated_m4a_fails(tmp_path):
    data = ffmpeg_bytes(tone(44100, 2, seconds=2.0), 44100, ".m4a", tmp_path, "-c:a", "aac", "-movflags", "+faststart")
    with pytest.raises(SampleFailed) as e:
        decode_audio(data[: len(data) // 2], "m4a")
    assert reasons(e) == "truncated:audio"
    index_at_end = ffmpeg_bytes(tone(44100, 2, seconds=2.0), 44100, ".m4a", tmp_path, "-c:a", "aac")
    with pytest.raises(SampleFailed) as e:  # the index (moov) is gone: nothing says how long it was
        decode_audio(index_at_end[: len(index_at_end) // 2], "m4a")
    assert reasons(e) == "decode:audio"


# ------------------------------------------------------------------------------------- process


@pytest.mark.parametrize("sr", [8000, 11025, 22050, 44100, 48000, 96000])
@pytest.mark.parametrize("channels", [1, 2, 6])
def test_resample_and_downmix(sr, channels):
    x = tone(sr, channels, seconds=1.37)
    y, info = process_audio(x, sr, AudioConfig(sample_rate=16000))
    assert y.ndim == 1 and y.dtype == np.float32
    assert abs(len(y) - round(len(x) * 16000 / sr)) <= 1
    assert info["sample_rate"] == 16000 and info["source_sample_rate"] == sr and info["source_channels"] == channels
    if channels == 1:
        assert peak_hz(y, 16000) == pytest.approx(440, abs=2)


@pytest.mark.parametrize("sr", [8000, 44100, 96000])
def test_keep_channels_and_vhq(sr):
    x = tone(sr, 6)
    y, info = process_audio(x, sr, AudioConfig(sample_rate=48000, mono=False, resample_quality="VHQ"))
    assert y.shape[1] == 6 and abs(len(y) - round(len(x) * 48000 / sr)) <= 1 and info["channels"] == 6
    for c in (0, 5):
        assert peak_hz(y[:, c], 48000) == pytest.approx(FREQS[c], abs=2)


def test_keep_source_rate():
    y, info = process_audio(tone(22050, 2), 22050, AudioConfig(sample_rate=None, mono=False))
    assert y.shape == (22050, 2) and info["sample_rate"] == 22050


def test_peak_normalisation():
    y, info = process_audio(tone(16000, amp=0.1), 16000, AudioConfig(normalize="peak", peak_db=-3.0))
    assert np.max(np.abs(y)) == pytest.approx(10 ** (-3 / 20), rel=1e-4)
    assert info["gain_db"] == pytest.approx(20 * np.log10(10 ** (-3 / 20) / 0.1), abs=0.01)


def test_loudness_normalisation_hits_the_target():
    import pyloudnorm

    x = tone(16000, seconds=3.0, amp=0.05) * np.linspace(0.2, 1, 48000, dtype=np.float32)[:, None]
    y, info = process_audio(x, 16000, AudioConfig(normalize="loudness", target_lufs=-20.0))
    assert pyloudnorm.Meter(16000).integrated_loudness(y.astype(np.float64)) == pytest.approx(-20.0, abs=0.1)
    assert info["loudness_lufs"] < -20 and "peak_limited" not in info


def test_loudness_gain_is_limited_by_the_peak_ceiling():
    x = np.zeros((32000, 1), np.float32)
    x[::4000] = 0.5  # clicks: quiet on average, loud peaks
    y, info = process_audio(x, 16000, AudioConfig(normalize="loudness", target_lufs=-10.0, peak_db=-1.0))
    assert info["peak_limited"] is True and np.max(np.abs(y)) == pytest.approx(10 ** (-1 / 20), rel=1e-4)


def test_loudness_of_a_short_clip_is_skipped_and_recorded():
    x = tone(16000, seconds=0.2)
    y, info = process_audio(x, 16000, AudioConfig(normalize="loudness"))
    assert info["loudness_lufs"] is None and "normalize_skipped" in info
    np.testing.assert_array_equal(y, x[:, 0])


def test_trim_silence():
    sr = 16000
    x = np.concatenate([np.zeros(sr), tone(sr, seconds=1.0)[:, 0], np.zeros(2 * sr)]).astype(np.float32)
    y, info = process_audio(x, sr, AudioConfig(trim_silence=True, top_db=40))
    assert 1.0 <= info["duration"] <= 1.0 + 2 * 2048 / sr  # librosa trims at frame granularity
    start, end = info["trimmed"]
    assert 1.0 - 2048 / sr <= start <= 1.0 and 2.0 <= end <= 2.0 + 2048 / sr


def test_silent_clip_with_trim_is_filtered():
    with pytest.raises(SampleFiltered) as e:
        process_audio(np.zeros(16000, np.float32), 16000, AudioConfig(trim_silence=True))
    assert reasons(e) == "silent:audio"


def test_duration_policy():
    x = tone(16000, seconds=2.0)
    with pytest.raises(SampleFiltered) as e:
        process_audio(x, 16000, AudioConfig(min_duration=2.5))
    assert reasons(e) == "duration:too_short"
    with pytest.raises(SampleFiltered) as e:
        process_audio(x, 16000, AudioConfig(max_duration=1.5))
    assert reasons(e) == "duration:too_long"
    y, info = process_audio(x, 16000, AudioConfig(max_duration=1.5, long_clips="cut"))
    assert len(y) == 24000 and info["cut_from"] == pytest.approx(2.0)
    y, _ = process_audio(x, 16000, AudioConfig(min_duration=2.0, max_duration=2.0))
    assert len(y) == 32000


def test_config_validation():
    with pytest.raises(ValidationError):
        AudioConfig(min_duration=3, max_duration=2)
    with pytest.raises(ValidationError):
        AudioConfig(normalize="rms")
    with pytest.raises(ValidationError):
        AudioConfig(fmin=8000, fmax=4000)


# ------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("channels", [1, 2])
def test_encode_flac_is_deterministic_and_lossless_at_16_bit(channels):
    x = tone(16000, channels, seconds=1.5) * 1.2  # past full scale: clipped, not wrapped
    x = x[:, 0] if channels == 1 else x
    a, b = encode_flac(x, 16000), encode_flac(x.copy(), 16000)
    assert a == b and a[:4] == b"fLaC"
    y, sr, info = decode_audio(a, "flac")
    assert sr == 16000 and info["codec"] == "PCM_16" and y.shape[1] == channels
    np.testing.assert_allclose(y[:, 0] if channels == 1 else y, np.clip(x, -1, 32767 / 32768), atol=0.51 / 32768)


def test_log_mel():
    sr = 16000
    cfg = AudioConfig(n_mels=64, n_fft=512, hop_length=160, fmax=8000)
    x = tone(sr, 2, seconds=1.0)
    mel = log_mel(x, sr, cfg)
    assert mel.dtype == np.float16 and mel.shape == (64, 1 + len(x) // 160)
    assert np.isfinite(mel).all() and mel.min() >= -100
    import librosa

    bands = librosa.mel_frequencies(n_mels=66, fmin=0, fmax=8000)[1:-1]
    loudest = bands[int(np.argmax(mel.astype(np.float32).mean(axis=1)))]
    assert 300 < loudest < 700  # the two tones, 440 and 660 Hz, averaged
    params = mel_params(cfg, sr)
    assert params["n_mels"] == 64 and params["fmax"] == 8000 and params["dtype"] == "float16"
    assert mel_params(AudioConfig(), 22050)["fmax"] == 11025


def test_decode_process_flac_roundtrip_from_a_file(tmp_path):
    path = tmp_path / "clip.flac"
    sf.write(path, tone(44100, 2), 44100)
    samples, sr, _ = decode_audio(path.read_bytes(), os.path.splitext(path.name)[1])
    y, info = process_audio(samples, sr, AudioConfig())
    data = encode_flac(y, info["sample_rate"])
    back, sr2, _ = decode_audio(data, "flac")
    assert sr2 == 16000 and len(back) == len(y) == 16000


def test_log_mel_bits_do_not_depend_on_blas_threads():
    """A BLAS product's last bits change with its thread count, and a float16 log-mel value on a rounding
    edge then differed by one step between a worker process and the test process (seen after the engine
    tests had run). The mel power (and so the log-mel) must have the same bits on 1 and 2 BLAS threads."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from mmdata.transforms.audio import AudioConfig, log_mel, mel_power

    cfg = AudioConfig(sample_rate=16000)
    clips = [0.1 * np.random.default_rng(i).standard_normal(16000 * 3).astype(np.float32) for i in range(12)]
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        one = [(mel_power(y, 16000, cfg), log_mel(y, 16000, cfg)) for y in clips]
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        two = [(mel_power(y, 16000, cfg), log_mel(y, 16000, cfg)) for y in clips]
    for (power1, mel1), (power2, mel2) in zip(one, two):
        assert power1.dtype == np.float32 and power1.shape == (cfg.n_mels, 301)
        assert mel1.dtype == np.float16 and mel1.shape == (cfg.n_mels, 301)
        assert power1.tobytes() == power2.tobytes() and mel1.tobytes() == mel2.tobytes()
