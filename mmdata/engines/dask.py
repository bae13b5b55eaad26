"""The Dask engine: one task per work unit on a Dask cluster (``--dask-address``) or a LocalCluster.

Tasks carry only the config and the unit's index, size and digest (a few KB; the worker reads the unit's
records from its row group of the plan); models are loaded in the worker process by
``run_unit``'s per-process context, once. Units that need an accelerator ask for a Dask resource
(``--dask-gpu-resource GPU`` → each task holds ``GPU=1`` while it runs), so they land only on
workers started with ``--resources GPU=1`` and never two at a time on one GPU. The resource is an
explicit opt-in applied to every task mmdata submits: units and index parts alike.
"""
from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

import dask
from distributed import Client, LocalCluster, as_completed
from distributed.comm import connect

from mmdata.config import BuildConfig
from mmdata.errors import UserError
from mmdata.pipeline.unit import run_unit
from mmdata.records import UnitRef

CONNECT_TIMEOUT_S = 5.0


async def _identify(address: str, timeout: float) -> dict:
    comm = await connect(address, timeout=timeout)
    try:
        await comm.write({"op": "identity", "reply": True})
        return await comm.read()
    finally:
        comm.abort()


def probe_scheduler(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A one-line UserError, within about ``timeout`` seconds, unless a Dask scheduler answers at ``address``.

    ``Client(timeout=…)`` bounds only the TCP connect: a peer that accepts and never speaks Dask (the
    dashboard port, a proxy) would hang it, so the whole handshake is bounded here first.
    """

    def identify() -> dict:
        return asyncio.run(asyncio.wait_for(_identify(address, timeout), timeout))

    with ThreadPoolExecutor(1) as pool:  # its own event loop, even when the caller runs one
        try:
            ident = pool.submit(identify).result()
        except (OSError, ValueError, TypeError, asyncio.TimeoutError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else f"no answer within {timeout:g} s"
            raise UserError(f"cannot reach Dask scheduler {address}: {reason}") from None
        except MemoryError:  # a non-Dask peer's bytes read as a frame length
            ident = None
    if not isinstance(ident, dict) or ident.get("type") != "Scheduler":
        raise UserError(f"cannot reach Dask scheduler {address}: the peer is not a Dask scheduler "
                        "(the scheduler port is usually 8786; 8787 is its dashboard)")


class DaskEngine:
    """Maps ``run_unit`` over units as Dask tasks, a bounded window of them in flight at a time."""

    def __init__(self, config: BuildConfig):
        self.cluster: Optional[LocalCluster] = None
        self.retries = config.dask_retries
        self.tag = hashlib.sha256(f"{config.config_hash}:{config.out}".encode()).hexdigest()[:12]
        self.resources = {config.dask_gpu_resource: 1} if config.dask_gpu_resource else None
        if config.dask_address:
            probe_scheduler(config.dask_address)
            self.client = Client(config.dask_address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
        else:
            # Each local worker offers one unit of the resource, so resource-tagged tasks can run. Dask's
            # default MALLOC_TRIM_THRESHOLD_=65536 turns off glibc's adaptive mmap threshold: every decoded
            # image is then mmapped and faulted in afresh (6x the page faults, 2.5x the system time here).
            with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
                self.cluster = LocalCluster(n_workers=config.n_workers, threads_per_worker=1, processes=True,
                                            dashboard_address=":0", resources=self.resources)
            self.client = Client(self.cluster, set_as_default=False)
        try:
            self._check_resources(config)
        except UserError:
            self.close()
            raise
        if config.progress and importlib.util.find_spec("bokeh") is not None:
            print(f"dask dashboard: {self.client.dashboard_link}", file=sys.stderr)

    def _check_resources(self, config: BuildConfig) -> None:
        """Refuse a resource no worker offers: its tasks would wait forever."""
        if not self.resources:
            return
        workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
        if workers and not any(config.dask_gpu_resource in w.get("resources", {}) for w in workers):
            raise UserError(f"no worker of {config.dask_address} offers the resource {config.dask_gpu_resource!r} "
                            f"(start workers with: dask worker ADDRESS --resources {config.dask_gpu_resource}=1)")

    def _window(self) -> int:
        return max(4, 2 * sum(self.client.nthreads().values()))

    def map_units(self, config: BuildConfig, units: list[UnitRef], on_done: Callable[[dict], None]) -> list[dict]:
        # Task keys name the unit, the config and the output (self.tag), so two builds on one scheduler
        # never share a task.
        queue = list(reversed(units))

        def submit():
            unit = queue.pop()
            return self.client.submit(run_unit, config, unit, key=f"mmdata-unit-{unit.name}-{self.tag}", pure=False,
                                      retries=self.retries, resources=self.resources)

        running = as_completed([submit() for _ in range(min(len(queue), self._window()))], loop=self.client.loop)
        results = []
        for future in running:
            results.append(future.result())
            future.release()
            on_done(results[-1])
            while queue and running.count() < self._window():
                running.add(submit())
        return results

    @property
    def parallelism(self) -> int:
        return max(1, sum(self.client.nthreads().values()))

    def map_tasks(self, fn: Callable[[Any], Any], items: Sequence[Any], *, name: str) -> list:
        """One task per item (items are small: all are submitted at once), with the units' retries
        and resources; results gathered in item order."""
        futures = [self.client.submit(fn, item, key=f"mmdata-{name}-{i:05d}-{self.tag}", pure=False,
                                      retries=self.retries, resources=self.resources)
                   for i, item in enumerate(items)]
        try:
            return self.client.gather(futures)
        finally:
            for future in futures:
                future.release()

    def close(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()
            self.client = None
        if self.cluster is not None:
            # A worker that imported torch takes seconds to exit; the nanny then kills it with a warning
            # that means nothing here: every unit has committed or the build is failing anyway.
            nanny_log = logging.getLogger("distributed.nanny")
            nanny_log.addFilter(_drop_slow_exit_warning)
            try:
                self.cluster.close()
            finally:
                nanny_log.removeFilter(_drop_slow_exit_warning)
            self.cluster = None


def _drop_slow_exit_warning(record: logging.LogRecord) -> bool:
    return "still alive after" not in record.getMessage()
