"""Audio quality measures: share of speech (Silero VAD, its ONNX model from the ``silero-vad``
package), integrated loudness (ITU-R BS.1770 via ``pyloudnorm``), share of clipped samples."""
from __future__ import annotations

import functools
import io
import math
from typing import Optional

import numpy as np

CLIP_LEVEL = 0.999  # |x| at or above this (of full scale) counts as clipped
VAD_RATE = 16000


@functools.lru_cache(maxsize=1)
def _vad():
    import torch

    import warnings

    threads = torch.get_num_threads()
    from silero_vad import load_silero_vad

    torch.set_num_threads(threads)  # importing silero_vad sets torch to one thread for the process
    with warnings.catch_warnings():  # silero_vad locates its model with a deprecated importlib call
        warnings.simplefilter("ignore", DeprecationWarning)
        return load_silero_vad(onnx=True)


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """A FLAC/WAV member as mono float32 and its rate."""
    import soundfile as sf

    x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return x.mean(axis=1), sr


def speech_ratio(x: np.ndarray, sr: int) -> float:
    """Seconds of speech found by Silero VAD over the clip's seconds."""
    import soxr
    import torch
    from silero_vad import get_speech_timestamps

    if not len(x):
        return 0.0
    y = soxr.resample(x, sr, VAD_RATE) if sr != VAD_RATE else x
    spans = get_speech_timestamps(torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)), _vad(),
                                  sampling_rate=VAD_RATE)
    return round(min(1.0, sum(s["end"] - s["start"] for s in spans) / len(y)), 4)


def loudness(x: np.ndarray, sr: int) -> Optional[float]:
    """Integrated loudness in LUFS; None for a clip shorter than one 400 ms block or digital silence."""
    import pyloudnorm

    if len(x) < int(0.4 * sr) + 1:
        return None
    value = pyloudnorm.Meter(sr).integrated_loudness(x.astype(np.float64))
    return round(float(value), 3) if math.isfinite(value) else None


def clipping_ratio(x: np.ndarray) -> float:
    return round(float(np.mean(np.abs(x) >= CLIP_LEVEL)) if len(x) else 0.0, 6)


def audio_measures(data: bytes, want_speech: bool) -> dict:
    x, sr = decode(data)
    out = {"loudness": loudness(x, sr), "clipping": clipping_ratio(x)}
    if want_speech:
        out["speech_ratio"] = speech_ratio(x, sr)
    return out
