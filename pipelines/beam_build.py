"""`mmdata build` as an Apache Beam pipeline, for any Beam runner (FnApiRunner locally, Flink, Spark, Dataflow).

    python -m pipelines.beam_build --input CORPUS --out OUT [mmdata options] [Beam pipeline options]

The driver plans the units (saved in OUT/plan.parquet); the pipeline is

    Create(ranges of unit indices) → FlatMap(indices) → Reshuffle → ParDo(RunUnitDoFn)
        → CombineGlobally(MergeUnitStats) → CheckTotals

(each worker reads its unit's records from its own row group of OUT/plan.parquet)

(the transforms live in ``mmdata.engines.beam_transforms``) and the driver runs ``finalize`` once it has
finished. ``RunUnitDoFn.setup`` builds the per-process
context (transforms, tokenizer, encoder model) once per worker. A retried bundle re-runs whole
units: ``run_unit`` skips committed units and writes everything under a temporary name first, so a
retry after a partial write leaves no duplicate and no corrupt shard. mmdata options are the
flags of ``mmdata build`` (``--samples-per-shard 1000``, ``--tokenize``…); every other flag goes to
Beam. Without ``--runner`` the FnApiRunner runs ``--workers`` processes on this machine.

A distributed index build (``--index-distributed``) runs one more, small pipeline on the same
runner, ``MapTasks``: Create(tasks) → Reshuffle → ParDo(add a group of units' embeddings to a
partial index under OUT/index/parts/, write the task's JSON result) → check the count.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from pydantic import BaseModel

from mmdata.config import BuildConfig

def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    """mmdata's own flags (those of ``mmdata build``); the rest are Beam pipeline options."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.beam_build", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)  # never read a Beam flag as an abbreviated mmdata one
    parser.add_argument("--config", "-c", help="YAML file with any mmdata option")
    skip = {"engine", "beam_options", "dask_address", "dask_gpu_resource", "dask_retries"}
    fields = {}
    for name, field in BuildConfig.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            for sub, subfield in field.annotation.model_fields.items():  # flat flags, as in the CLI
                fields.setdefault(sub, subfield)
        elif name not in skip:
            fields[name] = field
    for name, field in fields.items():
        flags = sorted({"--" + name.replace("_", "-"), "--" + name}, key=lambda f: "_" in f)  # both spellings
        if field.annotation is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=field.description)
        else:
            parser.add_argument(*flags, dest=name, default=None, help=field.description)
    return parser.parse_known_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    from mmdata.build import build
    from mmdata.cli.main import print_summary
    from mmdata.config import load_config
    from mmdata.errors import UserError

    args, beam_args = parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    try:
        config = load_config(args.config, engine="beam", beam_options=beam_args, **overrides)
        manifest = build(config)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print_summary(manifest, config.out)


if __name__ == "__main__":
    # Run under the importable name, so nothing Beam pickles refers to __main__.
    from pipelines.beam_build import main as _main

    _main()
