"""The op contract shared by every modality, and the small pydantic types op parameters use.

An op is a frozen pydantic model: its fields are the YAML parameters (``op``, ``p`` and its own),
``draw(rng, x, *ctx)`` returns the random parameters for one input (JSON-serialisable, already
rounded, so the record *is* what was applied), and ``apply(x, params, *ctx)`` is deterministic.
Replaying a record is ``apply`` with the recorded parameters.
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


def _ordered(value: tuple) -> tuple:
    if value[0] > value[1]:
        raise ValueError(f"range [{value[0]}, {value[1]}] must be [low, high] with low <= high")
    return value


FloatRange = Annotated[tuple[float, float], AfterValidator(_ordered)]
IntRange = Annotated[tuple[int, int], AfterValidator(_ordered)]


class Op(BaseModel):
    """One named augmentation with its probability ``p`` of firing."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    modality: ClassVar[str] = ""

    op: str
    p: float = Field(1.0, ge=0.0, le=1.0, description="probability that the op fires")

    def draw(self, rng: np.random.Generator, x: Any, *ctx: Any) -> dict:
        """The random parameters for input ``x`` (none by default)."""
        return {}

    def apply(self, x: Any, params: dict, *ctx: Any) -> Any:
        raise NotImplementedError


class MinMax(Op):
    """Ops configured audiomentations-style by ``min_<name>`` / ``max_<name>`` pairs."""

    @model_validator(mode="after")
    def _check_min_max(self) -> "MinMax":
        for name in type(self).model_fields:
            if name.startswith("min_") and f"max_{name[4:]}" in type(self).model_fields:
                lo, hi = getattr(self, name), getattr(self, f"max_{name[4:]}")
                if lo > hi:
                    raise ValueError(f"{name} ({lo}) must be <= max_{name[4:]} ({hi})")
        return self


def uniform(rng: np.random.Generator, lo: float, hi: float, digits: int = 4) -> float:
    """A uniform draw, rounded so that the recorded value is exactly the applied one."""
    return round(float(rng.uniform(lo, hi)), digits)
