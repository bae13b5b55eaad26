"""Audio: decode bytes to float32 samples, check what decoders let through, resample, normalise,
trim, apply the duration policy, encode FLAC and compute log-mel spectrograms.

Samples are ``float32`` arrays shaped ``[frames, channels]`` out of :func:`decode_audio`;
:func:`process_audio` returns ``[frames]`` when ``mono`` is on, ``[frames, channels]`` otherwise.
Every function here accepts both shapes.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import tempfile
from typing import Optional

import numpy as np
import soundfile as sf
import soxr

from mmdata.errors import SampleFailed, SampleFiltered
from mmdata.transforms.audio_config import AudioConfig  # noqa: F401  (defined apart: config.py needs it without soundfile)

# Containers libsndfile reads; anything else goes to ffmpeg.
SOUNDFILE_CONTAINERS = frozenset({"wav", "flac", "ogg", "mp3", "aiff", "caf", "au", "w64"})
# Extension -> the containers a file with that extension may legitimately hold.
_EXT_CONTAINERS = {
    "wav": {"wav"}, "wave": {"wav"}, "flac": {"flac"}, "ogg": {"ogg"}, "oga": {"ogg"}, "opus": {"ogg"},
    "mp3": {"mp3"}, "aiff": {"aiff"}, "aif": {"aiff"}, "aifc": {"aiff"}, "m4a": {"mp4"}, "mp4": {"mp4"},
    "m4b": {"mp4"}, "aac": {"aac", "mp4"}, "webm": {"matroska"}, "mka": {"matroska"}, "caf": {"caf"},
    "au": {"au"}, "snd": {"au"}, "wma": {"asf"}, "amr": {"amr"}, "w64": {"w64"},
}
_SILENCE_PEAK = 1e-6  # ~ -120 dBFS: with trim_silence on, a clip whose peak is below this is silent
_FFMPEG_TIMEOUT_S = 600
_READ_BLOCK = 1 << 18  # frames per soundfile read
_UNKNOWN_FRAMES = 1 << 40


# --------------------------------------------------------------------------------------- decode


def sniff_container(data: bytes) -> str:
    """Name the container from magic bytes: wav, flac, ogg, mp3, aiff, mp4, aac, ..., text or unknown."""
    head = data[:64]
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"riff":
        return "w64"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"\x1aE\xdf\xa3":
        return "matroska"
    if head[:4] == b"caff":
        return "caf"
    if head[:4] == b".snd":
        return "au"
    if head[:4] == b"0&\xb2u":
        return "asf"
    if head[:5] == b"#!AMR":
        return "amr"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return "aac" if (head[1] >> 1) & 3 == 0 else "mp3"  # ADTS has layer bits 00
    sample = data[:512]
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = sample[: exc.start].decode("utf-8") if exc.start > len(sample) - 4 else ""
    if text and sum(c.isprintable() or c in "\r\n\t" for c in text) >= 0.95 * len(text):
        return "text"
    return "unknown"


def _wav_header_frames(data: bytes) -> Optional[int]:
    """Frames the WAV header declares (data chunk size / block align), None when unknown (streamed)."""
    pos, block_align = 12, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if cid == b"fmt " and pos + 22 <= len(data):
            block_align = struct.unpack("<H", data[pos + 20:pos + 22])[0]
        elif cid == b"data":
            # 0, 0xFFFFFFFF or ~2 GiB (0x7FFFF000 from espeak-ng/sox --stdout): a streamed file's placeholder
            if size == 0 or size >= 0x7FFF0000 or not block_align:
                return None
            return size // block_align
        pos += 8 + size + (size & 1)
    return None


def _aiff_header_frames(data: bytes) -> Optional[int]:
    """Frames the AIFF COMM chunk declares."""
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack(">I", data[pos + 4:pos + 8])[0]
        if cid == b"COMM" and pos + 14 <= len(data):
            return struct.unpack(">I", data[pos + 10:pos + 14])[0]
        pos += 8 + size + (size & 1)
    return None


def _mp3_has_length_tag(data: bytes) -> bool:
    """True when the first MPEG frame carries a Xing/Info/VBRI tag, i.e. the frame count is exact."""
    start = 0
    if data[:3] == b"ID3" and len(data) >= 10:
        b = data[6:10]
        start = 10 + ((b[0] << 21) | (b[1] << 14) | (b[2] << 7) | b[3])
    window = data[start:start + 200]
    return any(tag in window for tag in (b"Xing", b"Info", b"VBRI"))


def _ogg_ends_with_eos(data: bytes) -> bool:
    """True when the last Ogg page has the end-of-stream flag; a truncated stream lacks it."""
    last = data.rfind(b"OggS", max(0, len(data) - 70000))
    return last >= 0 and last + 5 < len(data) and bool(data[last + 5] & 0x04)


class _NeedsFFmpeg(Exception):
    """libsndfile cannot read this file although it knows the container."""


def _read_all(f: sf.SoundFile, bio: io.BytesIO, size: int, max_frames: Optional[int] = None) -> np.ndarray:
    """Read every frame (at most ``max_frames``) in blocks (a header's frame count is not trusted with
    an allocation size); a decoder error at the end of the bytes is a truncation."""
    blocks, left = [], max_frames
    while left is None or left > 0:
        try:
            block = f.read(_READ_BLOCK if left is None else min(_READ_BLOCK, left), dtype="float32", always_2d=True)
        except sf.LibsndfileError as exc:
            reason = "truncated:audio" if bio.tell() >= size - 8192 else "decode:audio"
            raise SampleFailed(reason, f"{f.format}: {exc}") from None
        if not len(block):
            break
        blocks.append(block)
        if left is not None:
            left -= len(block)
    return np.concatenate(blocks) if blocks else np.zeros((0, f.channels), np.float32)


def _decode_soundfile(data: bytes, container: str, max_frames: Optional[int] = None) -> tuple[np.ndarray, int, dict]:
    if container == "ogg" and not _ogg_ends_with_eos(data):
        raise SampleFailed("truncated:audio", "ogg stream has no end-of-stream page")
    bio = io.BytesIO(data)
    try:
        with sf.SoundFile(bio) as f:
            sr, fmt, subtype, declared = f.samplerate, f.format, f.subtype, f.frames
            if declared >= _UNKNOWN_FRAMES:  # a streamed FLAC (0 total samples): libsndfile cannot read it
                raise _NeedsFFmpeg(f"{container} of undeclared length (streamed)")
            samples = _read_all(f, bio, len(data), max_frames)
    except sf.LibsndfileError as exc:
        raise SampleFailed("decode:audio", f"{container}: {exc.error_string}") from None
    expected, tolerance = declared, 0
    if container == "wav":
        expected = _wav_header_frames(data)
    elif container == "aiff":
        expected = _aiff_header_frames(data)
    elif container == "mp3":
        expected, tolerance = (declared, 2 * 1152) if _mp3_has_length_tag(data) else (None, 0)
    elif container == "ogg":
        expected = None  # the frame count comes from the last page; the EOS check covers truncation
    info = {"decoder": "soundfile", "format": fmt, "codec": subtype, "declared_frames": expected}
    if max_frames is not None and expected is not None:
        expected = min(expected, max_frames)  # only the head was asked for
    if len(samples) and expected is not None and len(samples) < expected - tolerance:
        raise SampleFailed("truncated:audio", f"decoded {len(samples)} of {expected} frames the header declares")
    return samples, sr, info


def _run_tool(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=_FFMPEG_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SampleFailed("decode:audio", f"{cmd[0]} timed out after {_FFMPEG_TIMEOUT_S} s") from None


def _ffmpeg_probe(path: str) -> dict:
    cmd = ["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries",
           "stream=codec_name,sample_rate,channels,duration", "-of", "json", path]
    proc = _run_tool(cmd)
    try:
        streams = json.loads(proc.stdout or b"{}").get("streams") or []
    except (ValueError, AttributeError):
        streams = []
    if proc.returncode != 0 or not streams:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise SampleFailed("decode:audio", f"ffprobe: {err[-1] if err else 'no audio stream'}")
    return streams[0]


def _decode_ffmpeg(data: bytes, container: str, what: str = "") -> tuple[np.ndarray, int, dict]:
    if not (shutil.which("ffmpeg") and shutil.which("ffprobe")):
        raise SampleFailed("decode:audio", f"{what or container} needs ffmpeg, which is not installed")
    # A temporary file, not a pipe: mp4 keeps its index (moov) at the end and needs seeking.
    with tempfile.TemporaryDirectory(prefix="mmdata-audio-") as tmp:
        path = os.path.join(tmp, "input")
        with open(path, "wb") as fh:
            fh.write(data)
        stream = _ffmpeg_probe(path)
        sr, channels = int(stream.get("sample_rate") or 0), int(stream.get("channels") or 0)
        if sr <= 0 or channels <= 0:
            raise SampleFailed("decode:audio", f"ffprobe: bad stream parameters {stream}")
        cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-i", path, "-map", "0:a:0",
               "-f", "f32le", "-c:a", "pcm_f32le", "-ac", str(channels), "-ar", str(sr), "pipe:1"]
        proc = _run_tool(cmd)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise SampleFailed("decode:audio", f"ffmpeg: {err[-1] if err else proc.returncode}")
    samples = np.frombuffer(proc.stdout, dtype="<f4")
    samples = samples[: len(samples) // channels * channels].reshape(-1, channels).astype(np.float32)
    expected = round(float(stream["duration"]) * sr) if stream.get("duration") not in (None, "N/A") else None
    if len(samples) and expected is not None and len(samples) < expected - (4096 + expected // 1000):
        raise SampleFailed("truncated:audio", f"decoded {len(samples)} of {expected} frames the container declares")
    info = {"decoder": "ffmpeg", "format": container, "codec": stream.get("codec_name"), "declared_frames": expected}
    complaints = proc.stderr.decode(errors="replace").strip().splitlines()
    if complaints:  # exit status 0, but ffmpeg hit damaged data (a bad frame, a cut-off stream end)
        raise SampleFailed("decode:audio", f"ffmpeg: {complaints[-1][:300]}")
    return samples, sr, info


def decode_audio(data: bytes, ext: str, max_frames: Optional[int] = None) -> tuple[np.ndarray, int, dict]:
    """Decode audio bytes to ``(float32 [frames, channels], sample_rate, info)``.

    The container is read from the content, not the extension (``info["ext_mismatch"]`` records a
    wrong extension). Raises ``SampleFailed`` with ``empty:audio`` (no bytes or no samples),
    ``truncated:audio`` (fewer samples than the header declares), ``nonfinite:audio`` (NaN/inf
    samples) or ``decode:audio`` (not audio, undecodable, or the format needs a missing ffmpeg).
    """
    ext = ext.lower().lstrip(".")
    if not data:
        raise SampleFailed("empty:audio", "zero bytes")
    container = sniff_container(data)
    if container == "text":
        raise SampleFailed("decode:audio", f"content is text, not audio (named .{ext})")
    mismatch = container != "unknown" and ext in _EXT_CONTAINERS and container not in _EXT_CONTAINERS[ext]
    if container in SOUNDFILE_CONTAINERS:
        try:
            samples, sr, info = _decode_soundfile(data, container, max_frames)
        except _NeedsFFmpeg as exc:
            samples, sr, info = _decode_ffmpeg(data, container, str(exc))
    elif container != "unknown":
        samples, sr, info = _decode_ffmpeg(data, container)
    else:  # no known magic: libsndfile may still recognise it, else ffmpeg probes everything it knows
        try:
            samples, sr, info = _decode_soundfile(data, container)
        except (SampleFailed, _NeedsFFmpeg) as exc:
            if isinstance(exc, SampleFailed) and (exc.reason != "decode:audio" or not shutil.which("ffmpeg")):
                raise
            samples, sr, info = _decode_ffmpeg(data, container)
    if len(samples) == 0:
        raise SampleFailed("empty:audio", "no samples (header only)")
    if not np.isfinite(samples).all():
        bad = int(np.count_nonzero(~np.isfinite(samples)))
        raise SampleFailed("nonfinite:audio", f"{bad} NaN/inf samples")
    info.update(container=container, ext=ext, ext_mismatch=bool(mismatch), sample_rate=sr,
                channels=samples.shape[1], frames=len(samples), duration=len(samples) / sr)
    return samples, sr, info


# ------------------------------------------------------------------------------------ transforms


def resample(samples: np.ndarray, sr: int, target_sr: int, quality: str = "HQ") -> np.ndarray:
    """Resample with soxr; the output has ``round(frames * target_sr / sr)`` frames (± 1)."""
    if sr == target_sr:
        return samples
    return soxr.resample(samples, sr, target_sr, quality=quality).astype(np.float32, copy=False)


def downmix(samples: np.ndarray) -> np.ndarray:
    """Mean over channels: ``[frames, channels]`` -> ``[frames]``."""
    return samples if samples.ndim == 1 else samples.mean(axis=1, dtype=np.float32)


def _loudness(samples: np.ndarray, sr: int) -> Optional[float]:
    """Integrated loudness (ITU-R BS.1770, pyloudnorm) or None when it cannot be measured."""
    import pyloudnorm

    if len(samples) < int(0.4 * sr) + 1:  # shorter than one gating block
        return None
    x = samples if samples.ndim == 1 or samples.shape[1] <= 5 else downmix(samples)  # BS.1770 weights 5 channels
    lufs = pyloudnorm.Meter(sr).integrated_loudness(x.astype(np.float64))
    return float(lufs) if np.isfinite(lufs) else None


def normalize(samples: np.ndarray, sr: int, cfg: AudioConfig) -> tuple[np.ndarray, dict]:
    """Peak or loudness normalisation; silent or too-short clips are left as they are (recorded)."""
    info: dict = {}
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    ceiling = 10 ** (cfg.peak_db / 20)
    gain = 1.0
    if cfg.normalize == "peak" and peak > 0:
        gain = ceiling / peak
    elif cfg.normalize == "loudness":
        lufs = _loudness(samples, sr)
        info["loudness_lufs"] = lufs
        if lufs is None:
            info["normalize_skipped"] = "loudness not measurable (silent or shorter than 0.4 s)"
        else:
            gain = 10 ** ((cfg.target_lufs - lufs) / 20)
            if peak * gain > ceiling:  # keep the peak under the ceiling rather than clip
                gain = ceiling / peak
                info["peak_limited"] = True
    if gain != 1.0:
        samples = (samples * np.float32(gain)).astype(np.float32, copy=False)
    info["gain_db"] = round(20 * float(np.log10(gain)), 3)
    return samples, info


def trim(samples: np.ndarray, top_db: float) -> tuple[np.ndarray, int, int]:
    """Cut leading and trailing silence (librosa.effects.trim); returns samples and the kept range."""
    import librosa

    y = samples if samples.ndim == 1 else samples.T
    _, (start, end) = librosa.effects.trim(y, top_db=top_db)
    return samples[start:end], int(start), int(end)


def process_audio(samples: np.ndarray, sr: int, cfg: AudioConfig) -> tuple[np.ndarray, dict]:
    """Downmix, resample, trim, apply the duration policy, normalise. Returns ``(samples, info)``.

    Raises ``SampleFiltered`` with ``duration:too_short``, ``duration:too_long`` (``long_clips=
    "filter"``) or ``silent:audio`` (``trim_silence`` on a clip with no signal). Durations are
    measured after trimming; ``long_clips="cut"`` keeps the first ``max_duration`` seconds.
    """
    x = np.asarray(samples, dtype=np.float32)
    channels_in = 1 if x.ndim == 1 else x.shape[1]
    info: dict = {"source_sample_rate": sr, "source_channels": channels_in, "source_duration": len(x) / sr}
    if cfg.mono:
        x = downmix(x)
    elif x.ndim == 1:
        x = x[:, None]
    out_sr = cfg.sample_rate or sr
    x = resample(x, sr, out_sr, cfg.resample_quality)
    if cfg.trim_silence:
        if x.size == 0 or float(np.max(np.abs(x))) < _SILENCE_PEAK:
            raise SampleFiltered("silent:audio", "no signal above -120 dBFS")
        x, start, end = trim(x, cfg.top_db)
        info["trimmed"] = [start / out_sr, end / out_sr]
    duration = len(x) / out_sr
    if len(x) == 0 or duration < cfg.min_duration:
        raise SampleFiltered("duration:too_short", f"{duration:.3f} s < {cfg.min_duration} s")
    if cfg.max_duration is not None and duration > cfg.max_duration:
        if cfg.long_clips == "filter":
            raise SampleFiltered("duration:too_long", f"{duration:.3f} s > {cfg.max_duration} s")
        x = x[: int(round(cfg.max_duration * out_sr))]
        info["cut_from"] = duration
    if cfg.normalize != "none":
        x, norm_info = normalize(x, out_sr, cfg)
        info.update(norm_info)
    x = np.ascontiguousarray(x, dtype=np.float32)
    info.update(sample_rate=out_sr, channels=1 if x.ndim == 1 else x.shape[1], frames=len(x), duration=len(x) / out_sr)
    return x, info


# -------------------------------------------------------------------------------------- outputs


def encode_flac(samples: np.ndarray, sr: int) -> bytes:
    """16-bit FLAC bytes; full scale is 32768 (libsndfile's convention, so decoding gives the value
    back within half a step); values past full scale are clipped. Same input -> same bytes (no dither)."""
    x = np.round(np.asarray(samples, dtype=np.float64) * 32768.0)
    pcm = np.clip(x, -32768, 32767).astype(np.int16)
    bio = io.BytesIO()
    sf.write(bio, pcm, sr, format="FLAC", subtype="PCM_16")
    return bio.getvalue()


def mel_params(cfg: AudioConfig, sr: int) -> dict:
    """The log-mel parameters, for the manifest (so a reader can reproduce or invert them)."""
    return {"library": "librosa", "sample_rate": sr, "n_mels": cfg.n_mels, "n_fft": cfg.n_fft,
            "hop_length": cfg.hop_length, "win_length": cfg.n_fft, "window": "hann", "center": True,
            "fmin": cfg.fmin, "fmax": cfg.fmax if cfg.fmax is not None else sr / 2, "power": 2.0,
            "scale": "10*log10(max(power, 1e-10)) dB", "dtype": "float16", "layout": "[n_mels, frames]"}


def mel_power(samples: np.ndarray, sr: int, cfg: AudioConfig) -> np.ndarray:
    """Mel power spectrogram ``float32 [n_mels, frames]`` of the (downmixed) clip (librosa's
    ``melspectrogram`` with :func:`mel_params`), with the same bits on any number of BLAS threads."""
    import librosa

    y = downmix(np.asarray(samples, dtype=np.float32))
    spec = np.abs(librosa.stft(y, n_fft=cfg.n_fft, hop_length=cfg.hop_length, window="hann", center=True,
                               pad_mode="constant")) ** 2
    basis = librosa.filters.mel(sr=sr, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax)
    # librosa.feature.melspectrogram's projection, done without BLAS: the last bits of a BLAS product
    # depend on how many threads it runs on (different in a worker process, a Dask worker or a process
    # that other libraries set up), and a float16 log-mel value on a rounding edge then differs by one
    # step between two builds. numpy's einsum without `optimize` sums in one fixed order.
    return np.einsum("mf,ft->mt", basis, spec, optimize=False)


def log_mel(samples: np.ndarray, sr: int, cfg: AudioConfig) -> np.ndarray:
    """Log-mel spectrogram ``float16 [n_mels, frames]`` of the (downmixed) clip; see :func:`mel_params`."""
    import librosa

    power = mel_power(samples, sr, cfg)
    return librosa.power_to_db(power, ref=1.0, amin=1e-10, top_db=None).astype(np.float16)
