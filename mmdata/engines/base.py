"""The engine contract: map ``run_unit`` over work units, yield each unit's stats as it commits.

An engine decides only *where* units run. Each engine lives in its own module and is imported
lazily, so a user without Dask or Beam installed can still use the local engine.
"""
from __future__ import annotations

import importlib
from typing import Callable, Protocol

from mmdata.config import BuildConfig
from mmdata.errors import UserError
from mmdata.records import Unit

ENGINES = {
    "local": "mmdata.engines.local:LocalEngine",
    "dask": "mmdata.engines.dask:DaskEngine",
    "beam": "mmdata.engines.beam:BeamEngine",
}
EXTRA_OF = {"dask": "dask", "beam": "beam"}


class Engine(Protocol):
    def map_units(self, config: BuildConfig, units: list[Unit], on_done: Callable[[dict], None]) -> list[dict]:
        """Run every unit; call ``on_done(stats)`` as each commits; return all stats."""

    def close(self) -> None:
        """Release workers and clusters."""


def get_engine(config: BuildConfig) -> Engine:
    target = ENGINES.get(config.engine)
    if target is None:
        raise UserError(f"engine {config.engine!r} is not available in this version (choose: {', '.join(ENGINES)})")
    module, cls = target.split(":")
    try:
        return getattr(importlib.import_module(module), cls)(config)
    except ImportError as exc:
        extra = EXTRA_OF.get(config.engine, config.engine)
        raise UserError(f"engine {config.engine} needs {exc.name}: pip install 'mmdata[{extra}]'") from None
