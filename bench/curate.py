"""Semantic dedup (SemDeDup) at scale: synthetic clustered embeddings with planted near-duplicates.

Writes N x 512 float16 embeddings (default 200,000; MMDATA_BENCH_CURATE_N=1000000 for the issue's
size) as per-shard ``.npy`` files, the way a build stores them: points scattered around 1,000 centres
(two points of one centre have cosine about 0.5), and 1 % of them followed by a planted near-duplicate
(cosine about 0.9987). ``mmdata.curate.semantic.semantic_dedup`` (k-means, then pairwise cosine per
cluster, eps 0.01) runs in a child process, so its peak RSS is measured alone (RUSAGE_CHILDREN of a
small wrapper). Prints precision and recall of the planted pairs (target ≥ 0.95 each), wall time, and
the peak RSS against 2 GiB.

Then the driver's memory of a whole ``mmdata curate`` at several sizes (default 10,000 and 50,000
rows; ``--driver-sizes 10000,50000,200000`` or ``MMDATA_BENCH_CURATE_DRIVER`` for more): a real build of
tiny images (500 patterns, so perceptual and exact duplicates abound) and captions, curated with 2
workers and a CLIP-free config in a fresh process that prints its own peak RSS (VmHWM: the driver;
every stage runs two tasks at least, so no task runs in it) and its largest worker's
(RUSAGE_CHILDREN). Prints the ratio of the peaks against the ratio of the sizes and the bytes per
added row (target: flat, under 50 bytes per added row: the driver holds per-shard counts only). And
the write task of the curated shard that spans the most input rows (with 95 % exact duplicates,
about 20 per kept sample), re-run alone from its plan in a fresh process: its peak RSS (VmHWM) and
bytes per spanned row.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import numpy as np

LIMIT = 2 * 2**30
DRIVER_BYTES_PER_ROW = 50
ROWS_PER_SHARD = 50_000
CENTRES = 1000
DUP_NOISE = 0.05
EPS = 0.01

CHILD = """
import sys, numpy as np
from mmdata.curate.semantic import semantic_dedup
from mmdata.curate.vectors import VectorSet
from mmdata.storage import OutputDir
root, n_shards, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sizes = [np.load(f"{root}/emb/{i:05d}.npy", mmap_mode="r").shape[0] for i in range(n_shards)]
parts = [{"url": root, "rels": [f"emb/{i:05d}.npy"]} for i in range(n_shards)]
part = np.concatenate([np.full(s, i, np.int64) for i, s in enumerate(sizes)])
row = np.concatenate([np.arange(s, dtype=np.int64) for s in sizes])
dup, kept, cos = semantic_dedup(VectorSet(parts, part, row), float(sys.argv[4]), out=OutputDir(root), folder="scratch")
np.save(f"{root}/result.npy", np.stack([dup, kept]))
"""

WRAPPER = ("import resource, subprocess, sys\n"
           "p = subprocess.run([sys.executable, '-c', sys.argv[1], *sys.argv[2:]])\n"
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
           "sys.exit(p.returncode)\n")


def write_corpus(root: str, n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Shards of float16 rows; returns the planted pairs (global original, global duplicate)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    os.makedirs(f"{root}/emb", exist_ok=True)
    src, dst, start, shard = [], [], 0, 0
    while start < n:
        m = min(ROWS_PER_SHARD, n - start)
        x = centres[rng.integers(0, CENTRES, m)] + rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        n_dup = m // 100
        picks = rng.permutation(m)[: 2 * n_dup]
        a, b = picks[:n_dup], picks[n_dup:]
        x[b] = x[a] + DUP_NOISE * rng.standard_normal((n_dup, dim)).astype(np.float32) / np.sqrt(dim)
        x[b] /= np.linalg.norm(x[b], axis=1, keepdims=True)
        np.save(f"{root}/emb/{shard:05d}.npy", x.astype(np.float16))
        src.append(a + start)
        dst.append(b + start)
        start, shard = start + m, shard + 1
    return np.concatenate(src), np.concatenate(dst), shard


DRIVER = """
import resource, sys, time
from mmdata.curate import curate, load_curate_config
if __name__ == "__main__":
    t = time.perf_counter()
    m = curate(sys.argv[1], sys.argv[2], load_curate_config(workers=2, overwrite=True, samples_per_shard=500))
    # the driver's own peak is VmHWM, the high-water mark of the address space exec gave it: ru_maxrss would
    # carry the peak of the process that started it (a `make bench` run that built 1M-vector indexes first)
    hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(m["counts"]["inputs"], m["counts"]["written"], round(time.perf_counter() - t, 1),
          hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


WRITE_TASK = """
import json, sys
from mmdata.curate.write import WriteTask, run_write_task
run_write_task(WriteTask(*sys.argv[1:5], json.loads(sys.argv[5]), sys.argv[6]))
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def write_task_memory(build: str, curated: str, env: dict) -> tuple[int, int, int, int]:
    """The write task of the curated shard that spans the most input rows, re-run alone from its plan
    (recovered from the curated table: input shard and row of each key) in a fresh process, and again
    over the plan's first 50 rows: (rows spanned, kept, peak RSS, peak RSS of the 50-row task)."""
    import glob
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmdata.curate.write import PLAN_SCHEMA

    located = {}
    for path in sorted(glob.glob(f"{build}/shards/*.parquet")):
        name = os.path.basename(path)[: -len(".parquet")]
        located.update((k, (name, i)) for i, k in enumerate(pq.read_table(path, columns=["key"]).column("key").to_pylist()))
    sizes = {p: pq.read_metadata(p).num_rows for p in glob.glob(f"{curated}/shards/*.parquet")}
    table = pq.read_table(max(sizes, key=sizes.get))
    with open(f"{curated}/manifest.json") as fh:
        manifest = json.load(fh)
    peaks = []
    for rows in (table, table.slice(0, 50)):
        out = f"{curated}_write_{rows.num_rows}"
        keys = rows.column("key").to_pylist()
        plan = {"in_shard": [located[k][0] for k in keys], "in_pos": [located[k][1] for k in keys]}
        plan.update({f.name: rows.column(f.name) for f in PLAN_SCHEMA if f.name not in plan})
        os.makedirs(f"{out}/scratch/units", exist_ok=True)
        pq.write_table(pa.table(plan, schema=PLAN_SCHEMA), f"{out}/scratch/units/00000.parquet")
        proc = subprocess.run([sys.executable, "-c", WRITE_TASK, build, out, "scratch", "00000",
                               json.dumps(list((manifest.get("embeddings") or {}).get("modalities") or [])),
                               manifest["curate"]["config_hash"]], check=False, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"write task failed: {proc.stderr[-2000:]}")
        peaks.append(int(proc.stdout.split()[-1]))
        shutil.rmtree(out, ignore_errors=True)
    written = sum(s == "written" for s in table.column("status").to_pylist())
    return table.num_rows, written, peaks[0], peaks[1]


def image_manifest(root: str, n: int) -> str:
    """A manifest of ``n`` rows over 5,000 tiny PNGs (500 patterns with one pixel changed) and captions."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(f"{root}/img", exist_ok=True)
    base = rng.integers(0, 255, (500, 8, 8, 3), dtype=np.uint8)
    for i in range(min(n, 5000)):
        a = base[i % 500].copy()
        a[i % 8, (i // 8) % 8] = (i * 7) % 255
        Image.fromarray(a).resize((32, 32), Image.NEAREST).save(f"{root}/img/{i}.png")
    words = np.asarray(["red", "green", "blue", "cat", "dog", "house", "tree", "river", "stone", "light", "dark", "small",
                        "large", "old", "new", "bird", "fish", "road", "hill", "sky"])
    caps = [" ".join(w) for w in words[rng.integers(0, len(words), (n, 8))]]
    pq.write_table(pa.table({"key": [f"k{i:09d}" for i in range(n)], "image": [f"{root}/img/{i % 5000}.png" for i in range(n)],
                             "caption": caps}), f"{root}/m.parquet")
    return f"{root}/m.parquet"


def driver_memory(root: str, sizes: list[int]) -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "HF_HUB_OFFLINE": "1"}
    peaks = []
    for n in sizes:
        folder = f"{root}/driver_{n}"
        manifest = image_manifest(folder, n)
        subprocess.run([sys.executable, "-m", "mmdata", "build", "-i", manifest, "-o", f"{folder}/build", "--key-col", "key",
                        "--workers", "2", "--no-report", "--no-progress", "--samples-per-shard", "5000", "--image-size", "32"],
                       check=True, capture_output=True, env=env)
        proc = subprocess.run([sys.executable, "-c", DRIVER, f"{folder}/build", f"{folder}/curated"],
                              check=False, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"curate failed: {proc.stderr[-2000:]}")
        rows, written, wall, peak, worker = (float(v) for v in proc.stdout.split()[-5:])
        peaks.append(peak)
        print(f"curate {int(rows):,} rows ({int(written):,} kept): {wall:.1f} s, driver peak RSS {peak / 2**20:.0f} MiB, "
              f"largest worker {worker / 2**20:.0f} MiB; {peak / LIMIT:.3f} x the 2 GiB limit")
        spanned, kept, task, small = write_task_memory(f"{folder}/build", f"{folder}/curated", env)
        print(f"  write task of its largest shard ({kept:,} kept, {spanned:,} input rows spanned): peak RSS "
              f"{task / 2**20:.0f} MiB, {(task - small) / max(1, spanned - 50):,.0f} bytes per spanned row over "
              f"the same task on 50 rows ({small / 2**20:.0f} MiB)")
        shutil.rmtree(folder, ignore_errors=True)
    for i in range(1, len(sizes)):
        per_row = (peaks[i] - peaks[0]) / (sizes[i] - sizes[0])
        print(f"driver peak grows {peaks[i] / peaks[0]:.2f}x for {sizes[i] / sizes[0]:.0f}x the rows (flat: 1.00); "
              f"{per_row:,.0f} bytes per added row (target < {DRIVER_BYTES_PER_ROW}: "
              f"{'met' if per_row < DRIVER_BYTES_PER_ROW else 'NOT met'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=int(os.environ.get("MMDATA_BENCH_CURATE_N", 200_000)))
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--out", default="bench_out/curate")
    ap.add_argument("--driver-sizes", default=os.environ.get("MMDATA_BENCH_CURATE_DRIVER", "10000,50000"),
                    help="rows of the curate-driver memory runs, comma-separated (10000,50000,200000: the big one)")
    ap.add_argument("--driver-only", action="store_true", help="skip the semantic-dedup part")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    root = os.path.abspath(args.out)
    os.makedirs(root, exist_ok=True)
    if not args.driver_only:
        src, dst, n_shards = write_corpus(root, args.n, args.dim, seed=0)
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", WRAPPER, CHILD, root, str(n_shards), str(ROWS_PER_SHARD), str(EPS)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"semantic dedup failed: {proc.stderr[-2000:]}")
        peak = int(proc.stdout.strip().splitlines()[-1])
        dup, kept = np.load(f"{root}/result.npy")
        planted = {(int(a), int(b)) for a, b in zip(src, dst)}
        found = {(min(int(a), int(b)), max(int(a), int(b))) for a, b in zip(dup, kept)}
        planted = {(min(a, b), max(a, b)) for a, b in planted}
        hits = len(planted & found)
        precision, recall = hits / max(1, len(found)), hits / max(1, len(planted))
        print(f"{args.n:,} x {args.dim} float16 embeddings, {len(planted):,} planted near-duplicate pairs, eps {EPS}")
        print(f"removed {len(found):,}: precision {precision:.4f}, recall {recall:.4f} (target >= 0.95 each: "
              f"{'met' if min(precision, recall) >= 0.95 else 'NOT met'})")
        print(f"wall time: {wall:.1f} s ({args.n / wall:,.0f} vectors/s)")
        print(f"peak RSS of the dedup process: {peak / 2**20:.0f} MiB = {peak / LIMIT:.3f} x the 2 GiB limit")
    sizes = [int(v) for v in args.driver_sizes.split(",") if v]
    if sizes:
        driver_memory(root, sizes)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
