"""report.html stays bounded as a build grows: the report of the demo build and of the same build
widened to ``--shards`` shards (its shard files hard-linked under new numbers, counts scaled), its
size against the 20 MB target and its seconds per shard (the funnel reads every shard table's
status/reason columns; plots, grid and map read at most 64 shards).

    python -m bench.report [--shards 500]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

TARGET_BYTES = 20 * 2**20


def widen(src: str, dst: str, n: int) -> dict:
    """``dst``: ``src``'s shards repeated to ``n`` shards (hard links), with a manifest to match."""
    with open(os.path.join(src, "manifest.json")) as fh:
        manifest = json.load(fh)
    names = [s[:-4] for s in manifest["shards"]]
    for sub in ("index",):
        shutil.copytree(os.path.join(src, sub), os.path.join(dst, sub))
    os.makedirs(os.path.join(dst, "shards"))
    modalities = manifest.get("embeddings", {}).get("modalities", [])
    for m in modalities:
        os.makedirs(os.path.join(dst, "embeddings", m))
    for i in range(n):
        name, new = names[i % len(names)], f"{i:05d}"
        for suffix in (".tar", ".parquet", "_stats.json", "_offsets.json"):
            os.link(os.path.join(src, "shards", name + suffix), os.path.join(dst, "shards", new + suffix))
        for m in modalities:
            os.link(os.path.join(src, "embeddings", m, name + ".npy"), os.path.join(dst, "embeddings", m, new + ".npy"))
    scale = n / len(names)
    manifest["shards"] = [f"{i:05d}.tar" for i in range(n)]
    manifest["units"] = n
    manifest["records"] = round(manifest["records"] * scale)
    manifest["counts"] = {k: round(v * scale) for k, v in manifest["counts"].items()}
    manifest["reasons"] = {s: {r: round(c * scale) for r, c in v.items()} for s, v in manifest["reasons"].items()}
    with open(os.path.join(dst, "manifest.json"), "w") as fh:
        json.dump(manifest, fh)
    return manifest


def timed_report(out: str) -> tuple[float, int]:
    from mmdata.report import write_report

    start = time.perf_counter()
    write_report(out)
    return time.perf_counter() - start, os.path.getsize(os.path.join(out, "report.html"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=500)
    args = parser.parse_args()
    from mmdata.build import build
    from mmdata.config import load_config
    from pipelines.demo_corpus import make_corpus

    tmp = tempfile.mkdtemp(prefix="mmdata-bench-report-")
    try:
        corpus, small, wide = (os.path.join(tmp, d) for d in ("corpus", "small", "wide"))
        make_corpus(corpus)
        build(load_config(input=corpus, out=small, workers=2, samples_per_shard=8, model="mmdata-tiny",
                          pretrained="random", fused="mean", progress=False, report=False))
        m = widen(small, wide, args.shards)
        s_small, b_small = timed_report(small)
        s_wide, b_wide = timed_report(wide)
        with open(os.path.join(small, "manifest.json")) as fh:
            n_small = len(json.load(fh)["shards"])
        print(f"report of {n_small} shards: {b_small / 2**20:.2f} MB in {s_small:.1f} s")
        print(f"report of {args.shards} shards ({m['counts']['inputs']} rows): {b_wide / 2**20:.2f} MB in {s_wide:.1f} s "
              f"({1000 * s_wide / args.shards:.1f} ms per shard)")
        print(f"size ratio wide/small: {b_wide / b_small:.2f}  (bounded: the per-shard table is the only part that grows)")
        print(f"size vs the 20 MB target: {b_wide / TARGET_BYTES:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
