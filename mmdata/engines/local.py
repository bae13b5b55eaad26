"""The local engine: a process pool on this machine (the default)."""
from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Callable, Optional, Sequence

from mmdata.config import BuildConfig
from mmdata.pipeline.unit import get_context, run_unit, uses_torch_encoder
from mmdata.records import UnitRef
from mmdata.schema import skip_pandas_probe


class LocalEngine:
    """``--workers 1`` runs units in this process; more use a process pool (forked where that is safe,
    else spawned: ``start_method``).

    At most two units per worker are in flight, so a huge plan does not pickle every unit at once.
    The pool is shut down when the units are done (its workers hold the encoder models);
    ``map_tasks`` starts its own. Without a torch encoder, once every unit is done, the driver does
    not wait for the idle workers to exit (an interpreter's teardown, ~0.5 s): it finalizes meanwhile.
    The workers run mmdata's code only: pyarrow's pandas probe is skipped there (``skip_pandas_probe``).
    """

    def __init__(self, config: BuildConfig):
        self.workers = config.n_workers
        self.pool = None
        self.keep = False
        self.started = False  # a pool started by ``start``, that no unit has used yet

    def start(self, config: BuildConfig, first: Optional[Callable[[], Any]] = None) -> Optional[Future]:
        """Start the worker processes now, before the units are known: each imports mmdata and builds
        its UnitContext (codecs, models) meanwhile. ``first`` (a picklable call: the plan) runs on the
        first worker before anything else, and its future is returned (None without a pool: ``first``
        is then the caller's to run). In a worker, planning never imports pandas, which pyarrow would
        import in the driver to probe the lists planning hands it (~1 s of CPU). A plan of one unit is
        still built in this process, and the started workers are stopped without waiting for them."""
        future = None
        if self.workers > 1 and self.pool is None:
            self.pool, self.started = self._new_pool(self.workers), True
            if first is not None:
                future = self.pool.submit(first)
            for _ in range(self.workers):  # each submit spawns a process while none is idle
                self.pool.submit(warm_worker, config)
        return future

    def map_units(self, config: BuildConfig, units: list[UnitRef], on_done: Callable[[dict], None]) -> list[dict]:
        if self.workers == 1 or len(units) <= 1:
            self._shutdown()
            results = []
            for unit in units:
                results.append(run_unit(config, unit))
                on_done(results[-1])
            return results
        if self.pool is None:
            self.pool = self._new_pool(len(units))
        self.started = False
        results, pending, queue = [], set(), list(reversed(units))
        try:
            while queue or pending:
                while queue and len(pending) < 2 * self.workers:
                    pending.add(self.pool.submit(run_unit, config, queue.pop()))
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    results.append(fut.result())
                    on_done(results[-1])
            if not uses_torch_encoder(config):  # all done: nothing left for the workers but to exit
                self.pool.shutdown(wait=False)
                self.pool = None
        finally:
            self.close()
        return results

    @property
    def parallelism(self) -> int:
        return self.workers

    def map_tasks(self, fn: Callable[[Any], Any], items: Sequence[Any], *, name: str) -> list:
        """In this process for ``--workers 1`` (or a single item), else on a fresh process pool (one
        pool for all calls after ``keep_pool()``, until ``close()``)."""
        if self.workers == 1 or len(items) <= 1:
            return [fn(item) for item in items]
        if self.started:  # workers started for units that never came: the tasks get a pool of their own
            self._shutdown()
        if self.pool is None:
            self.pool = self._new_pool(self.workers if self.keep else len(items))
        try:
            return list(self.pool.map(fn, items))
        finally:
            if not self.keep:
                self.close()

    def keep_pool(self) -> None:
        """Keep one pool of ``workers`` processes for every ``map_tasks`` until ``close()``: many short
        rounds of tasks (curation) then pay for starting the workers once."""
        self.keep = True

    def _new_pool(self, n_items: int) -> ProcessPoolExecutor:
        ctx = multiprocessing.get_context(start_method())
        return ProcessPoolExecutor(max_workers=min(self.workers, n_items), mp_context=ctx, initializer=skip_pandas_probe)

    def close(self) -> None:
        self._shutdown()
        self.keep = False

    def _shutdown(self) -> None:
        if self.pool is not None:
            if self.started:  # started, but no unit ran (one unit, an error, nothing to do): no waiting
                for process in list(self.pool._processes.values()):  # for their imports or models
                    process.terminate()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool, self.started = None, False


def start_method() -> str:
    """How the workers start: ``fork`` where it is safe, else ``spawn``; ``MMDATA_START_METHOD`` decides.

    A forked worker has the driver's imports (mmdata, numpy, pyarrow, pydantic: ~0.8 s of CPU a spawned
    worker spends before its first unit) and starts in milliseconds. It is used on Linux when this
    process has no Python thread but the main one (a threaded application, a notebook kernel: its
    threads' locks would be copied mid-use) and has not imported torch (CUDA cannot be forked).
    The native threads numpy's OpenBLAS and pyarrow's allocator keep are fork-safe (they register
    pthread_atfork handlers), as they are for Python's default start method on Linux."""
    chosen = os.environ.get("MMDATA_START_METHOD", "")
    if chosen in ("fork", "spawn", "forkserver"):
        return chosen
    safe = (sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
            and threading.active_count() == 1 and "torch" not in sys.modules)
    return "fork" if safe else "spawn"


def warm_worker(config: BuildConfig) -> None:
    """A started worker's first task: its UnitContext (the unit code, codecs, models), built ahead."""
    get_context(config)
