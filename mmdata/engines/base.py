"""The engine contract: map ``run_unit`` over work units, yield each unit's stats as it commits;
map any other picklable function over small tasks (the distributed index build uses it).

An engine decides only *where* work runs. Each engine lives in its own module and is imported
lazily, so a user without Dask or Beam installed can still use the local engine.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol, Sequence

from mmdata.config import BuildConfig
from mmdata.errors import UserError
from mmdata.records import UnitRef

ENGINES = {
    "local": "mmdata.engines.local:LocalEngine",
    "dask": "mmdata.engines.dask:DaskEngine",
    "beam": "mmdata.engines.beam:BeamEngine",
}
EXTRA_OF = {"dask": "dask", "beam": "beam"}


class Engine(Protocol):
    def map_units(self, config: BuildConfig, units: list[UnitRef], on_done: Callable[[dict], None]) -> list[dict]:
        """Run every unit; call ``on_done(stats)`` as each commits; return all stats."""

    @property
    def parallelism(self) -> int:
        """How many tasks can run at once (a hint for sizing tasks, not a promise)."""

    def map_tasks(self, fn: Callable[[Any], Any], items: Sequence[Any], *, name: str) -> list:
        """``[fn(item) for item in items]``, run where the units run; results in the order of ``items``.

        ``fn`` must be importable by name (a module-level function) and idempotent: an engine may run
        an item more than once (retries, lost workers). Items and results must be small and results
        JSON-serialisable (the Beam engine brings them back through storage); anything big is
        written by ``fn`` itself, atomically, under the output folder. ``name`` labels the tasks.
        """

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
