"""AudioConfig: how audio becomes training samples. Kept apart from :mod:`mmdata.transforms.audio`
so that :mod:`mmdata.config` can nest it without importing soundfile/soxr (the ``audio`` extra)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AudioConfig(BaseModel):
    """How audio is turned into training samples. Every field changes the output bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sample_rate: Optional[int] = Field(16000, ge=1000, le=768000, description="target rate; None keeps the source rate")
    resample_quality: Literal["HQ", "VHQ"] = Field("HQ", description="soxr resampling quality")
    mono: bool = Field(True, description="downmix to one channel (mean of channels); False keeps channels")
    normalize: Literal["none", "peak", "loudness"] = Field("none", description="audio level: none, peak or loudness (EBU R128)")
    peak_db: float = Field(-1.0, le=0.0, description="peak target (peak) / peak ceiling (loudness), dBFS")
    target_lufs: float = Field(-23.0, le=0.0, description="integrated loudness target (EBU R128: -23)")
    trim_silence: bool = Field(False, description="cut leading and trailing silence")
    top_db: float = Field(60.0, gt=0.0, description="trim: frames this far below the clip's peak are silence")
    min_duration: float = Field(0.0, ge=0.0, description="seconds, after trimming; shorter clips are filtered")
    max_duration: Optional[float] = Field(None, gt=0.0, description="seconds, after trimming")
    long_clips: Literal["cut", "filter"] = Field("filter", description="clips over max_duration: keep the head or filter")
    mel: bool = Field(False, description="write {key}.mel.npy (float16 log-mel, [n_mels, frames])")
    n_mels: int = Field(80, ge=1, le=512, description="mel bands of {key}.mel.npy")
    n_fft: int = Field(400, ge=16, description="FFT size of the mel spectrogram")
    hop_length: int = Field(160, ge=1, description="hop of the mel spectrogram, in samples")
    fmin: float = Field(0.0, ge=0.0, description="lowest mel frequency (Hz)")
    fmax: Optional[float] = Field(None, gt=0.0, description="None: half the sample rate")

    @model_validator(mode="after")
    def _check_ranges(self) -> "AudioConfig":
        if self.max_duration is not None and self.max_duration < self.min_duration:
            raise ValueError("max_duration must be >= min_duration")
        if self.fmax is not None and self.fmax <= self.fmin:
            raise ValueError("fmax must be > fmin")
        return self
