"""Benchmark: the index mmdata chooses under a memory budget vs autofaiss's, on the same vectors.

    .venv/bin/python bench/index_budget.py
    MMDATA_INDEX_BUDGET_N=300000,1000000 MMDATA_INDEX_BUDGET_GB=0.1,0.4 .venv/bin/python bench/index_budget.py

Clustered unit vectors (float16 .npy files, like real embedding shards; ``bench.index_build.generate``)
plus 1,000 held-out queries from the same distribution. For each size and budget, both tools build an
inner-product index from the same folder under the same budget, each in its own process:
mmdata's ``build_index(memory_gb=B)`` in this interpreter, autofaiss 2.18's
``build_index(max_index_memory_usage="BG")`` in a side virtualenv that this script creates under
``bench_out/autofaiss-venv`` (``autofaiss==2.18.0`` with ``faiss-cpu==1.8.0.post1``: on faiss 1.15 its
OPQ step fails), never in the project's venv. Each searches the held-out queries with its own tuned
parameters; recall@10 is computed here, against exact search, the same way for both. Printed side by
side: the index chosen, its size on disk, build seconds, recall@10, the CPU seconds of each tool's whole
process (less sensitive than wall time to what else runs on shared cores), and the ratios (targets: recall
at least autofaiss's, build time at most 1/3 of autofaiss's, size within the budget).

Defaults (``make bench``): 20,000 x 512 at 0.006 GiB (about the bytes per vector of 300k at 0.1 GiB),
so that autofaiss too finishes in a few minutes on 2 cores (it took over 20 minutes at 100k). Env: ``MMDATA_INDEX_BUDGET_N`` (sizes, comma-separated), ``MMDATA_INDEX_BUDGET_GB``
(budgets in GiB), ``MMDATA_INDEX_BUDGET_DIM`` (512), ``MMDATA_INDEX_BUDGET_PEER=0`` (mmdata only).
If the side virtualenv cannot be made (no network, no wheel), the reason is printed and mmdata's
figures still are.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench.index_build import generate  # noqa: E402

N_QUERIES = 1000
K = 10
ROWS_PER_FILE = 50_000
VENV = os.path.join(ROOT, "bench_out", "autofaiss-venv")
PEER_PINS = ["autofaiss==2.18.0", "faiss-cpu==1.8.0.post1", "pyarrow<18"]  # autofaiss pins numpy<2
GiB = 2**30

PEER_CHILD = r'''
import json, os, sys, time
import numpy as np
from autofaiss import build_index

cfg = json.loads(sys.argv[1])
start = time.perf_counter()
index, infos = build_index(embeddings=cfg["emb"], index_path=cfg["index"], index_infos_path=cfg["infos"],
                           max_index_memory_usage=cfg["budget"], current_memory_available=cfg["ram"],
                           metric_type="ip", verbose=30)
seconds = time.perf_counter() - start
if index is None:
    import faiss
    index = faiss.read_index(cfg["index"])
queries = np.load(cfg["queries"]).astype("float32")
t = time.perf_counter()
_, found = index.search(queries, cfg["k"])
search_ms = 1000 * (time.perf_counter() - t) / len(queries)
np.save(cfg["found"], found)
infos = infos or {}
print(json.dumps({"index_key": infos.get("index_key"), "params": infos.get("index_param"),
                  "size_bytes": os.path.getsize(cfg["index"]), "build_seconds": seconds, "ms_per_query": search_ms}))
'''


def env_list(name: str, default: str, cast):
    return [cast(v) for v in os.environ.get(name, default).split(",") if v.strip()]


def make_data(folder: str, n: int, dim: int) -> tuple[str, np.ndarray, np.ndarray, list[tuple[str, np.ndarray]]]:
    """``n`` indexed vectors in ``folder/emb`` (npy files only, as autofaiss reads a folder), 1,000 held-out
    queries, their exact top-10 row numbers, and (file, ids) pairs for mmdata (ids = global row numbers)."""
    raw = os.path.join(folder, "raw")
    os.makedirs(raw)
    files = generate(raw, n + N_QUERIES, dim, ROWS_PER_FILE)
    emb = os.path.join(folder, "emb")
    os.makedirs(emb)
    sources, start, queries = [], 0, []
    for path, ids_path in files:
        x = np.load(path)
        os.unlink(path)
        os.unlink(ids_path)
        keep = x[: max(0, min(len(x), n - start))]
        queries.append(x[len(keep):])
        if len(keep):
            out = os.path.join(emb, os.path.basename(path))
            np.save(out, keep)
            sources.append((out, np.arange(start, start + len(keep), dtype=np.int64)))
            start += len(keep)
    shutil.rmtree(raw)
    q = np.concatenate(queries).astype(np.float32)
    return emb, q, exact_top(q, sources), sources


def exact_top(queries: np.ndarray, sources: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """Exact inner-product top-K row numbers, file by file."""
    import faiss

    heap = faiss.ResultHeap(len(queries), K, keep_max=True)
    for path, ids in sources:
        x = np.load(path).astype(np.float32)
        scores, rows = faiss.knn(queries, x, K, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, ids[rows])
    heap.finalize()
    return heap.I


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found top-10 ∩ exact top-10| / 10."""
    return float(np.mean([len(set(f[:K]) & set(t)) / K for f, t in zip(found, truth)]))


def worker(cfg: dict) -> dict:
    """Runs in its own process: mmdata's build under the budget, then a search of the held-out queries."""
    from mmdata.index import EmbeddingSource, build_index, load_index, search

    sources = [EmbeddingSource(p, np.load(i)) for p, i in cfg["sources"]]
    start = time.perf_counter()
    infos = build_index(sources, cfg["index"], memory_gb=cfg["memory_gb"])
    seconds = time.perf_counter() - start
    index = load_index(cfg["index"], infos)
    queries = np.load(cfg["queries"])
    t = time.perf_counter()
    found = search(index, queries, K)[1]
    search_ms = 1000 * (time.perf_counter() - t) / len(queries)
    np.save(cfg["found"], found)
    return {"index_key": infos["index_key"], "params": infos["search_params_string"], "size_bytes": infos["size_bytes"],
            "build_seconds": seconds, "ms_per_query": search_ms, "infos": infos}


def ensure_peer() -> tuple[str | None, str]:
    """The side virtualenv's python with autofaiss, or None and why not."""
    python = os.path.join(VENV, "bin", "python")
    if os.path.exists(os.path.join(VENV, ".ready")):
        return python, "ready"
    try:
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True, capture_output=True, text=True, timeout=300)
        proc = subprocess.run([python, "-m", "pip", "install", "-q", *PEER_PINS], capture_output=True, text=True,
                              timeout=1800)
    except (subprocess.SubprocessError, OSError) as exc:
        return None, f"could not create {VENV}: {exc}"
    if proc.returncode != 0:
        return None, f"pip install {' '.join(PEER_PINS)} failed: {proc.stderr.strip().splitlines()[-1:]}"
    open(os.path.join(VENV, ".ready"), "w").close()
    return python, "installed"


def run_child(cmd: list[str]) -> dict:
    # both tools alike: OpenMP threads sleep rather than spin while they wait (on shared, busy cores
    # spinning made faiss' k-means 3x slower with 2 threads than with 1)
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # CPU seconds of the whole child (build, search, start-up): on shared cores wall time depends on
    # what else runs, CPU time much less, so the bench prints both
    out["cpu_seconds"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return out


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2])), default=str))
        return
    sizes = env_list("MMDATA_INDEX_BUDGET_N", "20000", int)
    budgets = env_list("MMDATA_INDEX_BUDGET_GB", "0.006", float)
    dim = int(os.environ.get("MMDATA_INDEX_BUDGET_DIM", "512"))
    peer, why = (None, "MMDATA_INDEX_BUDGET_PEER=0") if os.environ.get("MMDATA_INDEX_BUDGET_PEER") == "0" else ensure_peer()
    print(f"{os.cpu_count()} cpus; autofaiss 2.18: {why if peer is None else 'side venv ' + VENV}", flush=True)
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="mmdata-budget-") as tmp:
            emb, queries, truth, sources = make_data(tmp, n, dim)
            qpath = os.path.join(tmp, "queries.npy")
            np.save(qpath, queries)
            ids_files = []
            for i, (path, ids) in enumerate(sources):
                ids_files.append((path, os.path.join(tmp, f"ids{i}.npy")))
                np.save(ids_files[-1][1], ids)
            for budget in budgets:
                header(n, dim, budget)
                rows = {}
                cfg = {"sources": ids_files, "index": os.path.join(tmp, "mm.index"), "memory_gb": budget,
                       "queries": qpath, "found": os.path.join(tmp, "mm_found.npy")}
                try:
                    rows["mmdata"] = run_child([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)])
                    rows["mmdata"]["recall"] = recall(np.load(cfg["found"]), truth)
                    row("mmdata", rows["mmdata"], budget)
                except RuntimeError as exc:
                    print(f"  mmdata failed: {exc}")
                if peer is not None:
                    pcfg = {"emb": emb, "index": os.path.join(tmp, "af.index"), "infos": os.path.join(tmp, "af.json"),
                            "budget": f"{budget}G", "ram": "8G", "queries": qpath, "k": K,
                            "found": os.path.join(tmp, "af_found.npy")}
                    try:
                        rows["autofaiss"] = run_child([peer, "-c", PEER_CHILD, json.dumps(pcfg)])
                        rows["autofaiss"]["recall"] = recall(np.load(pcfg["found"]), truth)
                        row("autofaiss", rows["autofaiss"], budget)
                    except RuntimeError as exc:
                        print(f"  autofaiss failed: {exc.args[0].strip().splitlines()[-1:]}")
                ratios(rows)


def header(n: int, dim: int, budget: float) -> None:
    print(f"\n{n:,} x {dim}, budget {budget} GiB ({budget * GiB / 2**20:.0f} MiB), recall@10 on {N_QUERIES} held-out "
          f"queries vs exact search", flush=True)
    print(f"  {'':<10} {'index chosen':<34} {'params':<24} {'size MiB':>9} {'build s':>9} {'recall@10':>9} {'ms/q':>7} {'cpu s':>8}")


def row(name: str, r: dict, budget: float) -> None:
    print(f"  {name:<10} {str(r['index_key']):<34} {str(r['params'] or '-'):<24} {r['size_bytes'] / 2**20:9.1f}"
          f" {r['build_seconds']:9.1f} {r['recall']:9.4f} {r['ms_per_query']:7.3f} {r.get('cpu_seconds', 0):8.1f}",
          flush=True)
    if "infos" not in r:  # the peer: does its index keep to the same budget?
        print(f"  {'':<10} size / budget {r['size_bytes'] / (budget * GiB):.2f}", flush=True)
    else:
        i = r["infos"]
        print(f"  {'':<10} split: choose {i.get('choose_seconds', 0):.1f} s / train {i['train_seconds']:.1f} s / add "
              f"{i['add_seconds']:.1f} s / tune {i['tune_seconds']:.1f} s; own leave-one-out recall@10 "
              f"{i['recall_at_10']}; size / budget {r['size_bytes'] / (budget * GiB):.2f} (target <= 1)", flush=True)


def ratios(rows: dict) -> None:
    mm, af = rows.get("mmdata"), rows.get("autofaiss")
    if mm and af:
        print(f"  ratios mmdata/autofaiss: recall {mm['recall'] / max(af['recall'], 1e-9):.3f} (target >= 1), build time "
              f"{mm['build_seconds'] / max(af['build_seconds'], 1e-9):.3f} (target <= 0.333), "
              f"process CPU time {mm['cpu_seconds'] / max(af['cpu_seconds'], 1e-9):.3f}, size "
              f"{mm['size_bytes'] / af['size_bytes']:.2f}", flush=True)


if __name__ == "__main__":
    main()
