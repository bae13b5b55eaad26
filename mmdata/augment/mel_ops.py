"""SpecAugment-style masks on a log-mel spectrogram ``[n_mels, frames]`` (the layout of
``{key}.mel.npy``): ``freq_mask`` blanks bands of mel bins, ``time_mask`` runs of frames.

Masked cells get ``value``: ``mean`` (the spectrogram's mean — SpecAugment's zero after
normalisation; the default, since a log-mel in dB has no natural zero), ``min``, or a number.
The dtype is kept.
"""
from __future__ import annotations

from typing import ClassVar, Literal, Union

import numpy as np
from pydantic import Field

from mmdata.augment.base import Op


class MelOp(Op):
    modality = "mel"
    max_width: int = Field(ge=0)
    count: int = Field(1, ge=1, le=16, description="masks per application (they may overlap)")
    value: Union[Literal["mean", "min"], float] = "mean"
    axis: ClassVar[int] = 0

    def draw(self, rng: np.random.Generator, mel: np.ndarray) -> dict:
        n = mel.shape[self.axis]
        masks = []
        for _ in range(self.count):
            width = int(rng.integers(0, min(self._max_width(n), n) + 1))
            masks.append([int(rng.integers(0, n - width + 1)), width])  # [start, width]
        return {"masks": masks}

    def _max_width(self, n: int) -> int:
        return self.max_width

    def apply(self, mel: np.ndarray, params: dict) -> np.ndarray:
        out = np.array(mel, copy=True)
        if out.size == 0:
            return out
        fill = {"mean": lambda: float(np.mean(mel, dtype=np.float64)),
                "min": lambda: float(np.min(mel))}.get(self.value, lambda: float(self.value))()
        view = out if self.axis == 0 else out.T
        for start, width in params["masks"]:
            view[start:start + width] = fill
        return out


class FreqMask(MelOp):
    """Blank ``count`` bands of up to ``max_width`` mel bins."""

    op: Literal["freq_mask"]
    max_width: int = Field(15, ge=0)


class TimeMask(MelOp):
    """Blank ``count`` runs of up to ``max_width`` frames (and at most ``max_fraction`` of the clip)."""

    op: Literal["time_mask"]
    max_width: int = Field(40, ge=0)
    max_fraction: float = Field(1.0, ge=0.0, le=1.0)
    axis: ClassVar[int] = 1

    def _max_width(self, n: int) -> int:
        return min(self.max_width, int(self.max_fraction * n))


MEL_OPS: dict[str, type[MelOp]] = {cls.model_fields["op"].annotation.__args__[0]: cls for cls in (FreqMask, TimeMask)}
