"""The Beam engine: runs the ``BuildShards`` pipeline (mmdata.engines.beam_transforms) on the runner named in ``--beam-option``s.

Without ``--runner`` it is the FnApiRunner with ``--workers`` SDK worker processes on this machine
(not the DirectRunner, which fetches the Prism runner from the internet). Flink, Spark and Dataflow
take their standard options; their workers need mmdata too (``--setup_file ./setup.py`` or an
``--sdk_container_image`` with it installed). ``map_tasks`` runs a second, small pipeline
(``MapTasks``) whose results come back through the output folder.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Callable, Sequence

from mmdata.engines.beam_transforms import NAMESPACE, BuildShards, MapTasks  # first: it imports Beam without its GCP warnings

from apache_beam import Pipeline
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import (DirectOptions, PipelineOptions, PortableOptions, StandardOptions,
                                                  WorkerOptions)
from apache_beam.runners.runner import PipelineState, create_runner

from mmdata.config import BuildConfig
from mmdata.errors import UserError
from mmdata.records import UnitRef
from mmdata.storage import OutputDir
from mmdata.pipeline.unit import plan_digest, read_committed

FN_API_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"
LOCAL_RUNNERS = {"fnapirunner", "directrunner", "switchingdirectrunner", "bundlebaseddirectrunner", "prismrunner"}
RUNNER_CHOICES = "FnApiRunner, DirectRunner, PrismRunner, FlinkRunner, SparkRunner, DataflowRunner, PortableRunner"
SHIPPING = ("setup_file", "sdk_container_image", "extra_packages", "requirements_file", "environment_config")


def beam_args(config: BuildConfig) -> list[str]:
    """``config.beam_options`` as Beam flags, plus the local defaults: FnApiRunner, multi-processing,
    ``--workers`` processes. ``runner=X`` (the CLI's ``--beam-option runner=X``) stands for ``--runner=X``."""
    args: list[str] = []
    for word in config.beam_options:
        value_of_previous = bool(args) and args[-1].startswith("-") and "=" not in args[-1]
        args.append(word if word.startswith("-") or value_of_previous else f"--{word}")
    runner = PipelineOptions(args).view_as(StandardOptions).runner
    if runner is None:
        args.append(f"--runner={FN_API_RUNNER}")
    if runner is None or runner.rsplit(".", 1)[-1].lower() == "fnapirunner":
        given = " ".join(args)
        if "--direct_running_mode" not in given:
            args.append("--direct_running_mode=multi_processing")
        if "--direct_num_workers" not in given:
            args.append(f"--direct_num_workers={config.n_workers}")
    return args


def make_runner(options: PipelineOptions):
    """The runner the options name; a one-line UserError for a name Beam does not know."""
    name = options.view_as(StandardOptions).runner
    try:
        return create_runner(name)
    except ValueError:
        raise UserError(f"unknown Beam runner {name!r} (choose {RUNNER_CHOICES}, or a PipelineRunner class path)") from None
    except (ImportError, AttributeError) as exc:
        raise UserError(f"Beam runner {name} is not available: {str(exc).splitlines()[0]}") from None


class BeamEngine:
    """Builds the pipeline for the planned units, runs it to the end, then reports each committed unit."""

    def __init__(self, config: BuildConfig):
        self.config = config
        self.options = PipelineOptions(beam_args(config))
        self.runner = make_runner(self.options)  # before anything runs: Beam's own errors are obscure
        self.counters: dict[str, int] = {}
        name = self.options.view_as(StandardOptions).runner.rsplit(".", 1)[-1].lower()
        given = self.options.get_all_options(drop_default=True)
        loopback = (self.options.view_as(PortableOptions).environment_type or "").upper() == "LOOPBACK"
        if name not in LOCAL_RUNNERS and not loopback and not any(k in given for k in SHIPPING):
            print("warning: Beam workers must import mmdata: ship it with --setup_file ./setup.py or run "
                  "an --sdk_container_image that has it installed", file=sys.stderr)

    def map_units(self, config: BuildConfig, units: list[UnitRef], on_done: Callable[[dict], None]) -> list[dict]:
        pipeline = Pipeline(runner=self.runner, options=self.options)
        _ = pipeline | "BuildShards" >> BuildShards(config, units)
        self.counters = read_counters(run_to_the_end(pipeline))
        out = OutputDir(config.out)
        results = []
        for unit in units:  # every unit has committed its stats file by now (finalize re-checks)
            stats = read_committed(out, unit.name, config.config_hash, config.embedded_modalities, plan_digest(unit))
            if stats is not None:
                results.append(stats)
                on_done(stats)
        return results

    @property
    def parallelism(self) -> int:
        """The runner's worker count where the options name one, else ``--workers``."""
        workers = self.options.view_as(WorkerOptions)
        return (workers.max_num_workers or workers.num_workers or self.options.view_as(DirectOptions).direct_num_workers
                or self.config.n_workers)

    def map_tasks(self, fn: Callable[[Any], Any], items: Sequence[Any], *, name: str) -> list:
        """Runs ``Create(items) → Reshuffle → ParDo(fn)``; each result is written as
        ``OUT/.mmdata-tasks-<name>/<i>.json``, read back in item order, and the folder removed."""
        if not items:
            return []
        out = OutputDir(self.config.out)
        folder = f".mmdata-tasks-{name}"
        out.remove(folder)
        pipeline = Pipeline(runner=self.runner, options=self.options)
        _ = pipeline | f"Map-{name}" >> MapTasks(fn, list(items), self.config.out, folder)
        for name_, value in read_counters(run_to_the_end(pipeline)).items():  # tasks_run
            self.counters[name_] = self.counters.get(name_, 0) + value
        results = [json.loads(out.read_bytes(f"{folder}/{i:05d}.json")) for i in range(len(items))]
        out.remove(folder)
        return results

    def close(self) -> None:
        pass


def run_to_the_end(pipeline: Pipeline):
    """Run ``pipeline`` and wait; its result, or a RuntimeError unless it ended DONE."""
    result = pipeline.run()
    state = result.wait_until_finish()
    if state != PipelineState.DONE:
        raise RuntimeError(f"Beam pipeline ended {state}")
    return result


def read_counters(result) -> dict[str, int]:
    """The pipeline's mmdata counters (committed values where the runner has them)."""
    try:
        found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    except (NotImplementedError, KeyError):
        return {}
    counters = {}
    for c in found:
        value = c.committed if c.committed is not None else c.attempted
        counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + (value or 0)
    return counters
