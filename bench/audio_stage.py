"""Audio stage throughput: mmdata's decode → resample → log-mel → FLAC vs a bare loop of the same
library calls (soundfile, soxr, librosa), in seconds of audio processed per second, one process.

``bare_loop`` is the limit: no checks, no bookkeeping. ``mmdata_loop`` calls the functions the unit
of work uses (``decode_audio``, ``process_audio``, ``log_mel``, ``encode_flac``); ``mmdata_unit``
runs the real unit of work (``run_unit`` on one unit holding every file: + sha256, json, tar,
parquet). The ratios say what the validation (header checks, NaN scan, sniffing) and the
bookkeeping cost.

    python -m bench.audio_stage [--files 24] [--seconds 20] [--repeat 5]
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time

import numpy as np
import soundfile as sf

from mmdata.config import load_config
from mmdata.pipeline.plan import cut_units, list_records
from mmdata.pipeline.unit import run_unit
from mmdata.transforms.audio import AudioConfig, decode_audio, encode_flac, log_mel, process_audio

# (format, subtype, rate, channels): the mix a speech/audio corpus typically has
LAYOUTS = [("WAV", "PCM_16", 44100, 2), ("FLAC", "PCM_16", 48000, 2), ("WAV", "PCM_16", 16000, 1),
           ("FLAC", "PCM_24", 22050, 1), ("OGG", "VORBIS", 44100, 2), ("MP3", "MPEG_LAYER_III", 44100, 2)]
EXT = {"WAV": "wav", "FLAC": "flac", "OGG": "ogg", "MP3": "mp3"}


def make_files(root: str, n: int, seconds: float) -> list[str]:
    """Noise-modulated tones (compress like real audio, unlike pure tones), cycling through LAYOUTS."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        fmt, subtype, sr, ch = LAYOUTS[i % len(LAYOUTS)]
        t = np.arange(int(sr * seconds)) / sr
        env = np.abs(np.sin(2 * np.pi * 0.5 * t))[:, None]
        x = 0.3 * env * np.sin(2 * np.pi * (200 + 50 * i) * t)[:, None] + 0.02 * rng.standard_normal((len(t), ch))
        path = os.path.join(root, f"clip_{i:03d}.{EXT[fmt]}")
        sf.write(path, np.clip(x, -1, 1).astype(np.float32), sr, format=fmt, subtype=subtype)
        paths.append(path)
    return paths


def bare_loop(files: list[str], cfg: AudioConfig) -> float:
    """The same library calls without mmdata: returns seconds of (source) audio processed."""
    import librosa
    import soxr

    total = 0.0
    for path in files:
        x, sr = sf.read(path, dtype="float32", always_2d=True)
        total += len(x) / sr
        y = soxr.resample(x.mean(axis=1), sr, cfg.sample_rate, quality=cfg.resample_quality)
        mel = librosa.feature.melspectrogram(y=y, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
                                             n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax)
        librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None).astype(np.float16)
        bio = io.BytesIO()
        sf.write(bio, np.clip(np.round(y * 32768), -32768, 32767).astype(np.int16), cfg.sample_rate, format="FLAC")
    return total


def mmdata_loop(files: list[str], cfg: AudioConfig) -> float:
    """mmdata's functions, as the unit of work calls them: returns seconds of (source) audio processed."""
    total = 0.0
    for path in files:
        with open(path, "rb") as fh:
            samples, sr, info = decode_audio(fh.read(), os.path.splitext(path)[1])
        total += info["duration"]
        y, pinfo = process_audio(samples, sr, cfg)
        log_mel(y, pinfo["sample_rate"], cfg)
        encode_flac(y, pinfo["sample_rate"])
    return total


def mmdata_unit(files: list[str], cfg: AudioConfig) -> float:
    """``run_unit`` over the files' folder as one unit, into a fresh output folder: returns seconds
    of (source) audio processed."""
    root = os.path.dirname(files[0])
    out = tempfile.mkdtemp(prefix="mmdata-bench-audio-out-")
    try:
        config = load_config(input=root, out=out, require=["audio"], audio=cfg.model_dump(), workers=1, progress=False)
        unit = cut_units(list_records(config), len(files))[0]
        stats = run_unit(config, unit)
        assert stats["counts"]["written"] == len(files), stats
        return stats["audio"]["seconds"]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def timed(fns, files, cfg, repeat: int) -> list[float]:
    """Best of ``repeat`` runs of each function, interleaved (a shared machine drifts), in seconds of
    audio per second."""
    best = [0.0] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            seconds = fn(files, cfg)
            best[i] = max(best[i], seconds / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cfg = AudioConfig(sample_rate=16000, mono=True, mel=True)
    with tempfile.TemporaryDirectory(prefix="mmdata-bench-audio-") as root:
        files = make_files(root, args.files, args.seconds)
        bare_loop(files[:2], cfg)  # warm up: librosa/numba JIT, page cache
        mmdata_loop(files[:2], cfg)
        bare, ours, unit = timed([bare_loop, mmdata_loop, mmdata_unit], files, cfg, args.repeat)
    print(f"{args.files} files x {args.seconds:.0f} s ({len(LAYOUTS)} layouts), decode → 16 kHz mono → "
          f"{cfg.n_mels}-band log-mel → FLAC, one process")
    print(f"bare loop (limit): {bare:8.1f} s of audio / s")
    print(f"mmdata functions : {ours:8.1f} s of audio / s   ratio {ours / bare:6.3f} (/ bare)")
    print(f"mmdata run_unit  : {unit:8.1f} s of audio / s   ratio {unit / bare:6.3f} (/ bare)")


if __name__ == "__main__":
    main()
