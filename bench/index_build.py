"""Benchmark: build the auto-chosen FAISS index over synthetic clustered embeddings.

    .venv/bin/python bench/index_build.py [--sizes 100000 1000000] [--dim 512] [--quick]

For each size, unit vectors (float16, like real embedding shards) are generated chunk by chunk
into temporary .npy files of ``--rows-per-file`` rows, then ``build_index`` runs in a fresh
subprocess so that its peak RSS is measured alone (``resource.getrusage``; the delta is over the
worker's RSS before the build). Printed per size: the index chosen, build seconds (train / add /
tune), peak RSS delta and its ratio to the index size, recall@10 against exact search, ms per
query (batched, all threads), and recall@10 / recall target. Ratios, not timed assertions.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def generate(folder: str, n: int, dim: int, rows_per_file: int, *, n_clusters: int = 100, rank: int = 12,
             sigma: float = 1.0, seed: int = 0) -> list[tuple[str, str]]:
    """Write ``n`` clustered unit vectors and their random int64 ids; returns (npy, ids) paths."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bases = rng.standard_normal((n_clusters, rank, dim)).astype(np.float32) * (sigma / np.sqrt(dim))
    files = []
    for i, start in enumerate(range(0, n, rows_per_file)):
        rows = min(rows_per_file, n - start)
        chunk_rng = np.random.default_rng([seed, i])
        labels = chunk_rng.integers(0, n_clusters, rows)
        z = chunk_rng.standard_normal((rows, rank)).astype(np.float32)
        x = centres[labels]
        for r in range(rank):
            x += z[:, r : r + 1] * bases[labels, r]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = chunk_rng.integers(0, 2**62, rows, dtype=np.int64) * 2 + start  # distinct, not positions
        path = os.path.join(folder, f"{i:05d}.npy")
        np.save(path, x.astype(np.float16))
        np.save(path + ".ids.npy", ids)
        files.append((path, path + ".ids.npy"))
    return files


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(config: dict) -> dict:
    """Runs in its own process: build and report infos plus peak RSS over the pre-build RSS."""
    from mmdata.index import EmbeddingSource, build_index

    sources = [EmbeddingSource(p, np.load(ids)) for p, ids in config["files"]]
    import faiss  # noqa: F401 - loaded before the baseline so the library is not counted

    before = rss_bytes()
    infos = build_index(sources, config["out"], memory_gb=config["memory_gb"], recall_target=config["recall_target"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    infos["peak_rss_delta_bytes"] = peak - before
    return infos


def run(n: int, dim: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="mmdata-bench-") as tmp:
        start = time.perf_counter()
        files = generate(tmp, n, dim, args.rows_per_file)
        gen_seconds = time.perf_counter() - start
        config = {"files": files, "out": os.path.join(tmp, "bench.index"), "memory_gb": args.memory_gb,
                  "recall_target": args.recall_target}
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(config)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"build failed:\n{proc.stderr[-4000:]}")
        infos = json.loads(proc.stdout.strip().splitlines()[-1])
        infos["generate_seconds"] = round(gen_seconds, 1)
        return infos


def report(infos: dict) -> None:
    gib = 2**30
    print(
        f"n={infos['n']:>9,} dim={infos['dim']}  {infos['index_key']:<16} {infos['search_params_string'] or '-':<12}"
        f" build {infos['build_seconds']:7.1f}s (train {infos['train_seconds']:.1f} / add {infos['add_seconds']:.1f}"
        f" / tune {infos['tune_seconds']:.1f})  index {infos['size_bytes'] / gib:.3f} GiB"
        f"  peak RSS +{infos['peak_rss_delta_bytes'] / gib:.3f} GiB"
        f" ({infos['peak_rss_delta_bytes'] / infos['size_bytes']:.2f}x index)"
        f"  recall@1 {infos['recall_at_1']:.4f} recall@10 {infos['recall_at_10']:.4f}"
        f" ({infos['recall_at_10'] / infos['recall_target']:.3f}x target {infos['recall_target']})"
        f"  {infos['ms_per_query']:.3f} ms/query  [threads {infos['omp_threads']}, gpu {infos['gpu']}]",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="only 100k vectors")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="build_index's default budget")
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--tight-memory-gb", type=float, default=0.4,
                        help="then the largest size again under this budget: the compressed rung (0: skip)")
    parser.add_argument("--rows-per-file", type=int, default=50_000)
    parser.add_argument("--json", action="store_true", help="also print the full infos")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    sizes = [100_000] if args.quick else args.sizes
    print(f"memory budget {args.memory_gb} GiB (build_index default: 4.0), recall target {args.recall_target}, "
          f"{os.cpu_count()} cpus", flush=True)
    for n in sizes:
        infos = run(n, args.dim, args)
        report(infos)
        if args.json:
            print(json.dumps(infos))
    if args.tight_memory_gb:
        args.memory_gb = args.tight_memory_gb
        print(f"memory budget {args.memory_gb} GiB:", flush=True)
        infos = run(max(sizes), args.dim, args)
        report(infos)
        if args.json:
            print(json.dumps(infos))


if __name__ == "__main__":
    main()
