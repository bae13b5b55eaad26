"""Engines on one machine: the same build by the local engine, Dask (a LocalCluster) and Beam (the FnApiRunner,
multi-processing), with the same number of workers. Prints each engine's wall time and its ratio to the
local engine (target ≤ 1.15). Start-up counts: a LocalCluster and Beam's SDK workers are part of the wait,
and so is the fixed cost (a build of 2 photos in 2 units: workers started, mmdata imported, workers stopped)
with the ratio of the rest (the marginal throughput).
Runs are interleaved and the best of ``--repeat`` is kept, so a busy machine hurts every engine alike.

    python -m bench.engines [--copies 150] [--workers 2] [--repeat 2]
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import os
import shutil
import tempfile
import time

from bench.shard_stage import make_photos
from mmdata.build import build
from mmdata.config import load_config

ENGINES = ("local", "dask", "beam")
TARGET = 1.15


def timed_build(root: str, out: str, engine: str, workers: int, samples_per_shard: int = 100) -> float:
    start = time.perf_counter()
    manifest = build(load_config(input=root, out=out, engine=engine, workers=workers, image_size=256,
                                 samples_per_shard=samples_per_shard, progress=False, overwrite=True))
    assert manifest["counts"]["failed"] == 0
    return time.perf_counter() - start


def digest(out: str) -> str:
    h = hashlib.sha256()
    for f in sorted(glob.glob(f"{out}/shards/*.tar") + glob.glob(f"{out}/shards/*.parquet")):
        h.update(open(f, "rb").read())
    return h.hexdigest()


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=150)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="mmdata-bench-engines-")
    try:
        root = os.path.join(tmp, "corpus")
        os.makedirs(root)
        n = len(make_photos(root, args.copies))
        tiny = os.path.join(tmp, "tiny")
        os.makedirs(tiny)
        for path in sorted(glob.glob(f"{root}/*"))[:4]:  # two photos and their captions
            shutil.copy(path, tiny)
        best = {e: float("inf") for e in ENGINES}
        fixed = {e: float("inf") for e in ENGINES}
        for _ in range(args.repeat):
            for engine in ENGINES:
                fixed[engine] = min(fixed[engine], timed_build(tiny, os.path.join(tmp, "t" + engine), engine, args.workers, 1))
                best[engine] = min(best[engine], timed_build(root, os.path.join(tmp, engine), engine, args.workers))
        same = len({digest(os.path.join(tmp, e)) for e in ENGINES}) == 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"samples": n, "workers": args.workers, "seconds": best, "fixed_seconds": fixed,
              "ratio": {e: best[e] / best["local"] for e in ENGINES},
              "marginal_ratio": {e: (best[e] - fixed[e]) / (best["local"] - fixed["local"]) for e in ENGINES},
              "identical": same, "target": TARGET}
    print(f"engines: {n} photos → 256 px JPEG, {args.workers} workers each, best of {args.repeat}")
    for e in ENGINES:
        print(f"  {e:6s} {best[e]:6.1f} s  {n / best[e]:6.1f} samples/s  ratio to local {result['ratio'][e]:.3f}"
              + ("" if e == "local" else f" (target ≤ {TARGET})")
              + f"  | fixed cost {fixed[e]:4.1f} s, ratio of the rest {result['marginal_ratio'][e]:.3f}")
    print(f"  outputs byte-identical across engines: {'yes' if same else 'NO'}")
    return result


if __name__ == "__main__":
    main()
