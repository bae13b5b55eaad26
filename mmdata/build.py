"""The build driver: plan → engine maps run_unit → finalize (the engine stays open for a distributed index)."""
from __future__ import annotations

import sys
import time
from collections import Counter
from functools import partial

from tqdm import tqdm

from mmdata.config import BuildConfig
from mmdata.embed_switch import STAGING, finish_switch
from mmdata.encoders.factory import check_models
from mmdata.encoders.setup_facts import setup_facts, worker_setup_facts
from mmdata.engines.base import get_engine
from mmdata.errors import UserError
from mmdata.index.step import check_index_options
from mmdata.layout import clear_output
from mmdata.pipeline.finalize import finalize
from mmdata.pipeline.plan import check_input, make_or_load_plan
from mmdata.pipeline.retry import uncommit_transient
from mmdata.pipeline.unit import read_committed, setup_mismatch, uses_torch_encoder
from mmdata.storage import OutputDir


def resume_line(n_skipped: int, n_units: int) -> str:
    """``3 of 3 units already committed, skipped``."""
    return f"{n_skipped} of {n_units} units already committed, skipped"


def mismatched_units(config: BuildConfig, committed: dict[str, dict], engine) -> dict[str, str]:
    """{unit: ``device: cuda → cpu``} for the committed units whose encoder ran with another set-up
    (device kind, precision, torch threads) than this run's workers would: resuming would mix them."""
    if not committed or not uses_torch_encoder(config):
        return {}
    if config.engine == "local":
        setup = setup_facts(config)
    else:  # the workers' set-up, not the driver's: a cluster's workers may have GPUs the driver lacks
        setup = engine.map_tasks(worker_setup_facts, [config], name="setup")[0]
    found = {name: setup_mismatch(config, stats, setup) for name, stats in committed.items()}
    return {name: diff for name, diff in found.items() if diff}


def refusal_line(mismatched: dict[str, str], n_committed: int) -> str:
    diff, _ = Counter(mismatched.values()).most_common(1)[0]
    return (f"cannot resume: {len(mismatched)} of {n_committed} committed units were embedded with another set-up "
            f"({diff}); resume with the set-up they used, or pass --reembed-mismatched to re-embed them")


def build(config: BuildConfig) -> dict:
    """Run a whole build and return its manifest. Raises UserError for problems the user must fix."""
    started = time.perf_counter()
    check_input(config.input)
    check_index_options(config)
    check_models(config)  # before planning: a model that cannot be loaded fails in one line, now
    out = OutputDir(config.out)
    if config.overwrite:
        clear_output(out)  # only mmdata's files; a folder that is not an mmdata output is refused
    out.ensure_writable()
    finish_switch(out)  # an `mmdata embed` killed during its switch: finish it before resuming
    out.remove(STAGING)  # one killed before its switch: its staged units may not match what this build writes
    engine = get_engine(config)
    try:
        plan = partial(make_or_load_plan, config, out)
        planned = None
        if hasattr(engine, "start"):  # the local engine's workers start (imports, codecs, models) and plan
            # (fsspec's memory:// is per process: its plan is made here, where the driver reads it)
            planned = engine.start(config, first=None if "memory" in out.fs.protocol else plan)
        units, resumed = planned.result() if planned is not None else plan()
        if config.retry_failed:  # units with transient download failures are uncommitted, then built again
            uncommit_transient(config, out, units, resumed)
        committed: dict[str, dict] = {}
        if resumed:  # committed units are not handed to the engine: the bar and counts show this run's work
            for u in units:
                stats = read_committed(out, u.name, config.config_hash, config.embedded_modalities, u.digest)
                if stats is not None:
                    committed[u.name] = stats
        mismatched = mismatched_units(config, committed, engine)
    except BaseException:
        engine.close()
        raise
    if mismatched and not config.reembed_mismatched:
        engine.close()
        raise UserError(refusal_line(mismatched, len(committed)))
    skipped = set(committed) - set(mismatched)
    todo = [u for u in units if u.name not in skipped]
    total = sum(u.n_records for u in todo)
    if resumed and config.progress:
        print(f"resuming {out.url}: {resume_line(len(skipped), len(units))} (--overwrite to rebuild)", file=sys.stderr)
    bar = tqdm(total=total, unit="sample", disable=not config.progress or not todo, dynamic_ncols=True, desc="build")

    written = [0]

    def on_done(stats: dict) -> None:
        written[0] += stats["counts"]["written"]
        bar.set_postfix(written=written[0], refresh=False)
        bar.update(stats["counts"]["records"])  # the bar counts records (a split recording is one)

    try:
        try:
            if todo:
                engine.map_units(config, todo, on_done)
        finally:
            bar.close()
        return finalize(config, out, units, time.perf_counter() - started, engine=engine, skipped_units=skipped)
    finally:
        engine.close()
