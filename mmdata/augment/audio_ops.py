"""Waveform ops: gain, additive noise at an SNR, time shift, speed, pitch shift, low/high-pass.

Samples are float32 ``[frames]`` or ``[frames, channels]`` (the shapes of
:mod:`mmdata.transforms.audio`); the sample rate never changes. Resampling is soxr's, pitch shifting
librosa's (phase vocoder + soxr), filtering scipy's (Butterworth, zero-phase ``sosfiltfilt``).
Zero-length, very short and silent clips pass through without error or NaN.
"""
from __future__ import annotations

import warnings
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from mmdata.augment.base import MinMax, uniform


class AudioOp(MinMax):
    modality = "audio"


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


class Gain(AudioOp):
    """Multiply by a gain drawn in dB (no clipping: samples stay float)."""

    op: Literal["gain"]
    min_db: float = -6.0
    max_db: float = 6.0

    def draw(self, rng: np.random.Generator, x: np.ndarray, sr: int) -> dict:
        return {"gain_db": uniform(rng, self.min_db, self.max_db, digits=3)}

    def apply(self, x: np.ndarray, params: dict, sr: int) -> np.ndarray:
        return _f32(x * np.float32(10.0 ** (params["gain_db"] / 20.0)))


class Noise(AudioOp):
    """Add white Gaussian noise at an SNR drawn in dB, relative to the clip's RMS. Silence has no
    level to be relative to, so it stays silent (never NaN)."""

    op: Literal["noise"]
    min_snr_db: float = 10.0
    max_snr_db: float = 40.0

    def draw(self, rng: np.random.Generator, x: np.ndarray, sr: int) -> dict:
        return {"snr_db": uniform(rng, self.min_snr_db, self.max_snr_db, digits=3),
                "noise_seed": int(rng.integers(0, 2**31))}

    def apply(self, x: np.ndarray, params: dict, sr: int) -> np.ndarray:
        rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0
        if rms == 0.0:
            return _f32(x)
        noise = np.random.default_rng(params["noise_seed"]).standard_normal(x.shape)
        return _f32(x + noise * (rms / 10.0 ** (params["snr_db"] / 20.0)))


class TimeShift(AudioOp):
    """Shift by up to ``max_fraction`` of the clip either way; the duration is kept. ``rollover``
    wraps what falls off one end onto the other, else the gap is zero-filled."""

    op: Literal["time_shift"]
    max_fraction: float = Field(0.2, ge=0.0, le=1.0)
    rollover: bool = True

    def draw(self, rng: np.random.Generator, x: np.ndarray, sr: int) -> dict:
        most = int(self.max_fraction * len(x))
        return {"shift": int(rng.integers(-most, most + 1))}  # frames; > 0 moves later

    def apply(self, x: np.ndarray, params: dict, sr: int) -> np.ndarray:
        shift = params["shift"]
        if self.rollover or shift == 0:
            return _f32(np.roll(x, shift, axis=0))
        out = np.zeros_like(x)
        if abs(shift) < len(x):
            if shift > 0:
                out[shift:] = x[:-shift]
            else:
                out[:shift] = x[-shift:]
        return _f32(out)


class Speed(AudioOp):
    """Play faster or slower by a drawn factor: pitch and tempo change together and the duration
    becomes ``duration / factor`` (soxr resampling)."""

    op: Literal["speed"]
    min_factor: float = Field(0.9, gt=0.0)
    max_factor: float = Field(1.1, gt=0.0)

    def draw(self, rng: np.random.Generator, x: np.ndarray, sr: int) -> dict:
        return {"factor": uniform(rng, self.min_factor, self.max_factor)}

    def apply(self, x: np.ndarray, params: dict, sr: int) -> np.ndarray:
        import soxr

        if params["factor"] == 1.0 or len(x) == 0:
            return _f32(x)
        return _f32(soxr.resample(x, sr * params["factor"], sr, quality="HQ"))


class PitchShift(AudioOp):
    """Shift the pitch by a drawn number of semitones, keeping the duration (librosa)."""

    op: Literal["pitch_shift"]
    min_semitones: float = -2.0
    max_semitones: float = 2.0

    def draw(self, rng: np.random.Generator, x: np.ndarray, sr: int) -> dict:
        return {"semitones": uniform(rng, self.min_semitones, self.max_semitones, digits=3)}

    def apply(self, x: np.ndarray, params: dict, sr: int) -> np.ndarray:
        import librosa

        n = len(x)
        if n < 16 or params["semitones"] == 0:
            return _f32(x)
        n_fft = 2048 if n >= 2048 else 1 << (n.bit_length() - 1)  # a short clip gets a shorter window
        y = x if x.ndim == 1 else x.T
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = librosa.effects.pitch_shift(y, sr=sr, n_steps=params["semitones"], n_fft=n_fft,
                                              res_type="soxr_hq")
        return _f32(out if x.ndim == 1 else out.T)


class _Filter(AudioOp):
    """Butterworth filter at a drawn cutoff. A cutoff at or above Nyquist (a config meant for a
    higher sample rate) leaves the clip as it is, recorded as ``skipped``."""

    btype: ClassVar[str] = ""
    min_cutoff_hz: float = Field(gt=0.0)
    max_cutoff_hz: float = Field(gt=0.0)
    order: int = Field(8, ge=1, le=16, description="Butterworth order (applied forward and back)")

    def draw(self, rng: np.random.Generator, x: np.ndarray, sr: int) -> dict:
        params = {"cutoff_hz": uniform(rng, self.min_cutoff_hz, self.max_cutoff_hz, digits=1)}
        if params["cutoff_hz"] >= 0.999 * sr / 2:  # the config does not fit this sample rate: left as is
            params["skipped"] = "cutoff_above_nyquist"
        return params

    def apply(self, x: np.ndarray, params: dict, sr: int) -> np.ndarray:
        from scipy import signal

        if len(x) < 2 or "skipped" in params:
            return _f32(x)
        cutoff = params["cutoff_hz"]
        sos = signal.butter(self.order, cutoff, self.btype, fs=sr, output="sos")
        padlen = min(3 * (2 * len(sos) + 1), len(x) - 1)
        return _f32(signal.sosfiltfilt(sos, x, axis=0, padlen=padlen))


class LowPass(_Filter):
    """Remove content above a cutoff drawn in Hz (band-limiting: telephone, old recordings)."""

    btype: ClassVar[str] = "lowpass"
    op: Literal["low_pass"]
    min_cutoff_hz: float = Field(2000.0, gt=0.0)
    max_cutoff_hz: float = Field(7500.0, gt=0.0)


class HighPass(_Filter):
    """Remove content below a cutoff drawn in Hz (rumble, small speakers)."""

    btype: ClassVar[str] = "highpass"
    op: Literal["high_pass"]
    min_cutoff_hz: float = Field(20.0, gt=0.0)
    max_cutoff_hz: float = Field(400.0, gt=0.0)


AUDIO_OPS: dict[str, type[AudioOp]] = {
    cls.model_fields["op"].annotation.__args__[0]: cls
    for cls in (Gain, Noise, TimeShift, Speed, PitchShift, LowPass, HighPass)
}
