"""The build driver: plan → engine maps run_unit → finalize (the engine stays open for a distributed index)."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

from mmdata.config import BuildConfig
from mmdata.embedding import check_models
from mmdata.engines.base import get_engine
from mmdata.finalize import finalize
from mmdata.indexing import check_index_options
from mmdata.layout import clear_output
from mmdata.plan import check_input, make_or_load_plan
from mmdata.storage import OutputDir


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
    units, resumed = make_or_load_plan(config, out)
    total = sum(len(u.records) for u in units)
    if resumed and config.progress:
        print(f"resuming {out.url}: plan of {total} records in {len(units)} units (--overwrite to re-plan)", file=sys.stderr)
    engine = get_engine(config)
    bar = tqdm(total=total, unit="sample", disable=not config.progress, dynamic_ncols=True, desc="build")

    written = [0]

    def on_done(stats: dict) -> None:
        written[0] += stats["counts"]["written"]
        bar.set_postfix(written=written[0], refresh=False)
        bar.update(stats["counts"]["records"])  # the bar counts records (a split recording is one)

    try:
        try:
            engine.map_units(config, units, on_done)
        finally:
            bar.close()
        return finalize(config, out, units, time.perf_counter() - started, engine=engine)
    finally:
        engine.close()
