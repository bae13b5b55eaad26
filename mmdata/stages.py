"""The stage contract: what every transform and encoder looks like to an engine.

A stage is a plain object. ``setup()`` loads heavy state (a model) once per worker process;
``resources`` tells an engine where it can run. Stages never import an engine.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resources:
    """What a stage needs from the worker that runs it."""

    gpu: bool = False
    batch_size: int = 1


class Stage:
    """Base class: override ``setup`` for once-per-process state, ``__call__`` for the work."""

    name: str = "stage"
    resources: Resources = Resources()

    def setup(self) -> None:  # pragma: no cover - default is a no-op by design
        """Load heavy state once per worker process (models, tokenizers)."""

    def __call__(self, item):
        raise NotImplementedError
