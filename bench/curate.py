"""Semantic dedup (SemDeDup) at scale: synthetic clustered embeddings with planted near-duplicates.

Writes a build of N rows (default 200,000; MMDATA_BENCH_CURATE_N=1000000 for the issue's size): per
shard of 50,000 rows a table, a tar of one-byte members and 512-d float16 image embeddings: points
scattered around 1,000 centres (two points of one centre have cosine about 0.5), and 1 % of them
followed by a planted near-duplicate (cosine about 0.9987). Then ``mmdata curate`` with SemDeDup on the
image embeddings only (eps 0.01, 2 workers: the per-shard assign tasks and the cluster tasks curate
runs) in a fresh process, and scores precision and recall of the planted pairs from the curated
ledger (``duplicate:semantic_image:<kept key>``; target ≥ 0.95 each). Prints wall time and the peak
RSS of the driver (its VmHWM) and of the largest worker (its VmHWM, read while it runs: ``ru_maxrss``
of a spawned worker carries its parent's peak) against 2 GiB.

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
import json
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

SEMANTIC = """
import json, resource, sys, time
from mmdata.curate import curate, load_curate_config
if __name__ == "__main__":
    t = time.perf_counter()
    cfg = load_curate_config(workers=2, overwrite=True, exact=[], phash_max_distance=-1, semantic=["image"],
                             semantic_eps=float(sys.argv[3]))
    m = curate(sys.argv[1], sys.argv[2], cfg)
    hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"wall": time.perf_counter() - t, "driver": hwm, "counts": m["counts"],
                      "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def write_build(root: str, n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A finished build at ``root`` that ``mmdata curate`` reads: per shard of ``ROWS_PER_SHARD`` rows a
    table (keys ``k000000000``… in key order, every row written), a tar (one 1-byte member per sample)
    and ``embeddings/image/<shard>.npy`` (float16); ``shards/sizes.json`` and a manifest. Returns the
    planted pairs (global position of the original, of its near-duplicate)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmdata.config import BuildConfig
    from mmdata.schema import SHARD_SCHEMA
    from mmdata.writers.tar import write_tar

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for sub in ("shards", "embeddings/image"):
        os.makedirs(f"{root}/{sub}", exist_ok=True)
    src, dst, sizes, start, shard = [], [], {}, 0, 0
    while start < n:
        m = min(ROWS_PER_SHARD, n - start)
        x = centres[rng.integers(0, CENTRES, m)] + rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        n_dup = m // 100
        picks = rng.permutation(m)[: 2 * n_dup]
        a, b = picks[:n_dup], picks[n_dup:]
        x[b] = x[a] + DUP_NOISE * rng.standard_normal((n_dup, dim)).astype(np.float32) / np.sqrt(dim)
        x[b] /= np.linalg.norm(x[b], axis=1, keepdims=True)
        name = f"{shard:05d}"
        np.save(f"{root}/embeddings/image/{name}.npy", x.astype(np.float16))
        keys = [f"k{start + i:09d}" for i in range(m)]
        given = {"key": keys, "id": np.arange(start, start + m), "status": ["written"] * m, "warnings": [[]] * m,
                 "row": np.arange(m, dtype=np.int32), "source_bytes": np.ones(m, np.int64)}
        pq.write_table(pa.table([pa.array(given[f.name], f.type) if f.name in given else pa.nulls(m, f.type)
                                 for f in SHARD_SCHEMA], schema=SHARD_SCHEMA), f"{root}/shards/{name}.parquet")
        with open(f"{root}/shards/{name}.tar", "wb") as fh:
            write_tar(fh, ((k, {"txt": b"x"}) for k in keys))
        sizes[f"{name}.tar"] = m
        src.append(a + start)
        dst.append(b + start)
        start, shard = start + m, shard + 1
    config = BuildConfig(input=root, out=root, samples_per_shard=ROWS_PER_SHARD, index=False, report=False)
    with open(f"{root}/shards/sizes.json", "w") as fh:
        json.dump(sizes, fh)
    with open(f"{root}/manifest.json", "w") as fh:
        json.dump({"config": config.model_dump(mode="json"), "config_hash": config.config_hash,
                   "counts": {"records": n, "inputs": n, "written": n, "filtered": 0, "failed": 0},
                   "embeddings": {"modalities": ["image"]}, "finished": "synthetic"}, fh)
    return np.concatenate(src), np.concatenate(dst)


def _descendants(pid: int) -> list[int]:
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent[int(entry)] = int(fh.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        todo += kids
    return found


def _hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def run_watched(cmd: list[str], env: dict) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``cmd``; return its result and the largest VmHWM of its descendants (the engine's workers),
    read every 0.2 s: a worker's own peak, not what ``ru_maxrss`` inherits across fork and exec."""
    import threading

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peaks: dict[int, int] = {}

    def watch():
        while proc.poll() is None:
            for pid in _descendants(proc.pid):
                peaks[pid] = max(peaks.get(pid, 0), _hwm(pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    watcher.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), max(peaks.values(), default=0)


def semantic_bench(root: str, n: int, dim: int) -> None:
    """SemDeDup as ``mmdata curate`` runs it, on a synthetic build; scored from the curated ledger."""
    import glob

    import pyarrow.parquet as pq

    started = time.perf_counter()
    src, dst = write_build(f"{root}/semantic_build", n, dim, seed=0)
    print(f"{n:,} x {dim} float16 embeddings written as a build in {time.perf_counter() - started:.0f} s; "
          f"{len(src):,} planted near-duplicate pairs, eps {EPS}")
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "HF_HUB_OFFLINE": "1"}
    proc, worker = run_watched([sys.executable, "-c", SEMANTIC, f"{root}/semantic_build", f"{root}/semantic_out", str(EPS)], env)
    if proc.returncode != 0:
        raise RuntimeError(f"curate --semantic image failed: {proc.stderr[-2000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    prefix = "duplicate:semantic_image:"
    found = set()
    for path in sorted(glob.glob(f"{root}/semantic_out/shards/*.parquet")):
        t = pq.read_table(path, columns=["key", "reason"]).to_pydict()
        found |= {tuple(sorted((k, r[len(prefix):]))) for k, r in zip(t["key"], t["reason"]) if r and r.startswith(prefix)}
    planted = {tuple(sorted((f"k{a:09d}", f"k{b:09d}"))) for a, b in zip(src.tolist(), dst.tolist())}
    hits = len(planted & found)
    precision, recall = hits / max(1, len(found)), hits / max(1, len(planted))
    c = res["counts"]
    print(f"mmdata curate --semantic image (2 workers): {c['inputs']:,} in, {c['written']:,} kept, "
          f"{len(found):,} semantic duplicates: precision {precision:.4f}, recall {recall:.4f} "
          f"(target >= 0.95 each: {'met' if min(precision, recall) >= 0.95 else 'NOT met'})")
    print(f"wall time: {res['wall']:.1f} s ({n / res['wall']:,.0f} rows/s, the curated build written included)")
    print(f"peak RSS: driver {res['driver'] / 2**20:.0f} MiB = {res['driver'] / LIMIT:.3f} x the 2 GiB limit; "
          f"largest worker {worker / 2**20:.0f} MiB = {worker / LIMIT:.3f} x (its VmHWM; the driver's "
          f"RUSAGE_CHILDREN, which counts what a worker inherits across fork and exec: {res['children'] / 2**20:.0f} MiB)")
    shutil.rmtree(f"{root}/semantic_build", ignore_errors=True)
    shutil.rmtree(f"{root}/semantic_out", ignore_errors=True)


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
    ap.add_argument("--n", type=int, default=int(os.environ.get("MMDATA_BENCH_CURATE_N", "200000")))
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
        semantic_bench(root, args.n, args.dim)
    sizes = [int(v) for v in args.driver_sizes.split(",") if v]
    if sizes:
        driver_memory(root, sizes)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
