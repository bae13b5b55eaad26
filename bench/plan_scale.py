"""Planning at any size (issue 12): plan a generated parquet manifest of URL + caption rows
(LAION-like) with ``mmdata.pipeline.plan.save_plan`` in a child process, and print

- the planning time of 1,000,000 rows against the 5 s target (ratio ≤ 1 is the target);
- 2,000,000 rows (above ``plan.IN_MEMORY_ROWS``: the external sort, one key range at a time) and, with
  ``MMDATA_BENCH_PLAN_10M=1`` (or ``--rows``), 10,000,000 rows: the driver's peak RSS against the 2 GiB
  limit, and against the smallest size's peak (flat: a ratio near 1, whatever the number of rows).

Peak RSS is the child's ``ru_maxrss`` read by a small parent (``RUSAGE_CHILDREN``) that does nothing
else: a spawned interpreter inherits its parent's high-water mark, so the planning process is measured
from outside.

    python -m bench.plan_scale [--rows N ...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

TARGET_S_1M = 5.0
LIMIT_RSS = 2 << 30


def write_manifest(path: str, rows: int, seed: int = 0) -> None:
    """``rows`` of ``url, caption, similarity`` in shuffled order, written 1M rows at a time."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(rows)
    words = pa.array(["a", "photo", "of", "the", "red", "cat", "on", "blue", "sofa", "café", "street", "view"])
    writer = None
    try:
        for lo in range(0, rows, 1 << 20):
            ids = perm[lo:lo + (1 << 20)]
            n = len(ids)
            id_text = pa.array(ids).cast(pa.string())
            url = pc.binary_join_element_wise("https://img", pa.array(ids % 97).cast(pa.string()),
                                              ".example.com/i/", id_text, ".jpg", "")
            parts = [words.take(pa.array(rng.integers(0, len(words), n))) for _ in range(6)]
            caption = pc.binary_join_element_wise(*parts, " ")
            table = pa.table({"url": url, "caption": caption, "similarity": rng.random(n).astype(np.float32)})
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


CHILD = """
import json, sys, time
t0 = time.perf_counter()
from mmdata.config import load_config
from mmdata.pipeline.plan import save_plan
from mmdata.storage import OutputDir
config = load_config(None, input=sys.argv[1], out=sys.argv[2], image_col="url", text_col="caption")
out = OutputDir(config.out)
out.ensure_writable()
t1 = time.perf_counter()
units = save_plan(out, config)
print(json.dumps({"seconds": time.perf_counter() - t1, "units": len(units), "records": sum(u.n_records for u in units)}))
"""

PARENT = """
import resource, subprocess, sys
p = subprocess.run([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], capture_output=True, text=True)
sys.stderr.write(p.stderr[-3000:])
print(p.stdout.strip().splitlines()[-1] if p.stdout.strip() else "{}")
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print(u.ru_maxrss * 1024, u.ru_utime + u.ru_stime)
sys.exit(p.returncode)
"""


def plan_in_child(manifest: str, out: str) -> tuple[dict, int, float]:
    """(the child's JSON line, its peak RSS in bytes, its CPU seconds in all)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", PARENT, CHILD, manifest, out], check=False, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"planning failed: {proc.stderr[-2000:]}")
    line, usage = proc.stdout.strip().splitlines()[-2:]
    rss, cpu = usage.split()
    return json.loads(line), int(rss), float(cpu)


def main() -> None:
    ap = argparse.ArgumentParser()
    default = [1_000_000, 2_000_000] + ([10_000_000] if os.environ.get("MMDATA_BENCH_PLAN_10M") == "1" else [])
    ap.add_argument("--rows", type=int, nargs="+", default=default)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="mmdata-bench-plan-")
    first = None
    try:
        for rows in args.rows:
            manifest = os.path.join(tmp, f"m{rows}.parquet")
            write_manifest(manifest, rows)
            got, rss, cpu = plan_in_child(manifest, os.path.join(tmp, f"out{rows}"))
            assert got["records"] == rows, got
            print(f"plan {rows:>11,} rows: {got['seconds']:7.2f} s  {rows / got['seconds']:>10,.0f} rows/s  "
                  f"{got['units']} units  driver peak RSS {rss / 2**20:7.0f} MiB ({rss / rows:.0f} B/row)  "
                  f"child CPU {cpu:.1f} s (with interpreter start; load average {os.getloadavg()[0]:.1f})")
            if rows == 1_000_000:
                print(f"  time vs the {TARGET_S_1M:g} s target for 1M rows: ratio {got['seconds'] / TARGET_S_1M:.3f} (≤ 1)")
            if rows >= 10_000_000:
                print(f"  peak RSS vs the 2 GiB limit: ratio {rss / LIMIT_RSS:.3f} (≤ 1)")
            if first is None:
                first = (rows, rss)
            else:
                print(f"  peak RSS vs {first[0]:,} rows' peak, for {rows / first[0]:g}x the rows: ratio "
                      f"{rss / first[1]:.3f} (flat: ≈ 1)")
            shutil.rmtree(os.path.join(tmp, f"out{rows}"), ignore_errors=True)
            os.unlink(manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
