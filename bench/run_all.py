"""`make bench`: every benchmark, each printing its own figures and ratios measured in this run."""
from __future__ import annotations

import importlib
import sys
import time

BENCHES = ["bench.shard_stage", "bench.audio_stage", "bench.augment", "bench.embed_unit", "bench.embed_forward",
           "bench.engines", "bench.loader", "bench.index_build", "bench.index_budget", "bench.audio_memory",
           "bench.plan_scale", "bench.curate", "bench.download", "bench.report"]


def main() -> None:
    failed = []
    for name in BENCHES:
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        saved = sys.argv
        sys.argv = [name]
        try:
            importlib.import_module(name).main()
        except Exception as exc:  # a broken benchmark must not hide the others' figures
            failed.append(name)
            print(f"{name} failed: {type(exc).__name__}: {exc}")
        finally:
            sys.argv = saved
        print(f"({time.perf_counter() - start:.0f} s)", flush=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
