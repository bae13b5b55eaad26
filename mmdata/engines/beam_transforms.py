"""Apache Beam transforms of the Beam engine: the shard stage (``BuildShards``) and small engine tasks (``MapTasks``).

The pipeline is

    Create(ranges of unit indices) → FlatMap(indices) → Reshuffle → ParDo(RunUnitDoFn) → CombineGlobally(MergeUnitStats) → CheckTotals

The job graph holds only ranges of unit indices: each worker reads its unit's records from its own row
group of ``OUT/plan.parquet``, so the graph stays a few KB whatever the corpus (Dataflow refuses ~10 MB).

``RunUnitDoFn.setup`` builds the per-process context (transforms, tokenizer, encoder model) once per worker.
A retried bundle re-runs whole units: ``run_unit`` skips committed units and writes everything under a
temporary name first, so a retry after a partial write leaves no duplicate and no corrupt shard.
``MapTasks``: Create(tasks) → Reshuffle → ParDo(run the task, write its JSON result) → check the count.
The engine (``mmdata.engines.beam``) and the pipeline program (``pipelines.beam_build``) both use these.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any, Callable, Iterable, Iterator

_level = logging.root.manager.disable
logging.disable(logging.WARNING)  # Beam's import warns about optional GCP client libraries on the root logger
try:
    import apache_beam as beam
    from apache_beam.metrics import Metrics
finally:
    logging.disable(_level)

from mmdata.config import BuildConfig
from mmdata.pipeline.unit import get_context, run_unit
from mmdata.records import UnitIndex, UnitRef
from mmdata.storage import OutputDir

log = logging.getLogger("mmdata.beam")
NAMESPACE = "mmdata"
STATUSES = ("written", "filtered", "failed")


class RunUnitDoFn(beam.DoFn):
    """Unit index in, shard committed, the unit's stats out. Counts records by status and reason in Beam metrics."""

    def __init__(self, config: BuildConfig):
        self.config = config

    def setup(self) -> None:
        get_context(self.config)  # once per worker process: transforms, tokenizer, encoder model

    def process(self, unit: UnitIndex) -> Iterator[dict]:
        stats = run_unit(self.config, unit)
        Metrics.counter(NAMESPACE, "units_skipped" if stats.get("skipped") else "units_run").inc()
        for status in STATUSES:
            Metrics.counter(NAMESPACE, status).inc(stats["counts"][status])
        for status, by_reason in stats["reasons"].items():
            for reason, n in by_reason.items():
                Metrics.counter(NAMESPACE, f"{status}:{reason}").inc(n)
        yield stats


class MergeUnitStats(beam.CombineFn):
    """Units' stats → {units, counts, reasons}: what the whole build accounts for."""

    def create_accumulator(self) -> dict:
        return {"units": 0, "counts": Counter(), "reasons": {"filtered": Counter(), "failed": Counter()}}

    def add_input(self, acc: dict, stats: dict) -> dict:
        acc["units"] += 1
        acc["counts"].update(stats["counts"])
        for status, by_reason in stats["reasons"].items():
            acc["reasons"][status].update(by_reason)
        return acc

    def merge_accumulators(self, accs: Iterable[dict]) -> dict:
        merged = self.create_accumulator()
        for acc in accs:
            merged["units"] += acc["units"]
            merged["counts"].update(acc["counts"])
            for status, by_reason in acc["reasons"].items():
                merged["reasons"][status].update(by_reason)
        return merged

    def extract_output(self, acc: dict) -> dict:
        return {"units": acc["units"], "counts": dict(acc["counts"]),
                "reasons": {k: dict(sorted(v.items())) for k, v in acc["reasons"].items()}}


def check_totals(merged: dict, units: int, inputs: int) -> dict:
    """Fail the pipeline unless every unit and every record came back accounted for."""
    c = merged["counts"]
    if merged["units"] != units or c.get("inputs", 0) != inputs or \
            c.get("inputs", 0) != sum(c.get(s, 0) for s in STATUSES):
        raise RuntimeError(f"mmdata: {merged['units']} of {units} units, {c} for {inputs} records")
    log.info("mmdata: %d units, %s", units, c)
    return merged


def index_ranges(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted unit indices as ``(start, stop)`` runs: ``[0, 1, 2, 5]`` → ``[(0, 3), (5, 6)]``."""
    ranges: list[list[int]] = []
    for i in sorted(indices):
        if ranges and ranges[-1][1] == i:
            ranges[-1][1] = i + 1
        else:
            ranges.append([i, i + 1])
    return [(a, b) for a, b in ranges]


def expand_range(bounds: tuple[int, int]) -> Iterator[UnitIndex]:
    for i in range(*bounds):
        yield UnitIndex(i)


class BuildShards(beam.PTransform):
    """The whole shard stage as one transform: planned units' indices in, the build's merged stats out."""

    def __init__(self, config: BuildConfig, units: list[UnitRef]):
        super().__init__()
        self.config = config
        self.ranges = index_ranges(u.index for u in units)
        self.n_units = len(units)
        self.inputs = sum(u.n_records for u in units)

    def expand(self, pbegin):
        return (
            pbegin
            | "Units" >> beam.Create(self.ranges, reshuffle=False)
            | "Indices" >> beam.FlatMap(expand_range)
            | "Spread" >> beam.Reshuffle()
            | "RunUnit" >> beam.ParDo(RunUnitDoFn(self.config))
            | "MergeStats" >> beam.CombineGlobally(MergeUnitStats())
            | "CheckTotals" >> beam.Map(check_totals, self.n_units, self.inputs)
        )


class RunTaskDoFn(beam.DoFn):
    """(i, item) in; ``fn(item)`` written as JSON to ``folder/<i>.json`` under the output, atomically; i out.

    A retried bundle runs its items again and rewrites the same files: ``fn`` must be idempotent.
    """

    def __init__(self, fn: Callable[[Any], Any], out: str, folder: str):
        self.fn, self.out, self.folder = fn, out, folder

    def process(self, element: tuple[int, Any]) -> Iterator[int]:
        i, item = element
        result = json.dumps(self.fn(item), sort_keys=True).encode()
        OutputDir(self.out).write_bytes(f"{self.folder}/{i:05d}.json", result)
        Metrics.counter(NAMESPACE, "tasks_run").inc()
        yield i


def check_count(n: int, expected: int) -> int:
    if n != expected:
        raise RuntimeError(f"mmdata: {n} of {expected} tasks ran")
    return n


class MapTasks(beam.PTransform):
    """Any engine task (``Engine.map_tasks``): small items in, their results written under the output."""

    def __init__(self, fn: Callable[[Any], Any], items: list, out: str, folder: str):
        super().__init__()
        self.fn, self.items, self.out, self.folder = fn, items, out, folder

    def expand(self, pbegin):
        return (
            pbegin
            | "Items" >> beam.Create(list(enumerate(self.items)), reshuffle=False)
            | "Spread" >> beam.Reshuffle()
            | "Run" >> beam.ParDo(RunTaskDoFn(self.fn, self.out, self.folder))
            | "Count" >> beam.combiners.Count.Globally()
            | "Check" >> beam.Map(check_count, len(self.items))
        )
