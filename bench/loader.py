"""Training loader throughput: ``mmdata.loader.make_loader`` vs a bare webdataset pipeline doing the
same work (read, shuffle buffer, decode the JPEG, the model's 224 px preprocessing, batch of 64) in
the same number of DataLoader workers; and the cost of the batched FAISS neighbour lookup.

Ours does more per sample than the bare pipeline (the (shard, row) join of stored embeddings, the
json metadata, token ids, the collation into a dict), so the ratio measures that overhead. Both run
with persistent workers, in turn epoch by epoch; the first epoch of each (worker start-up) is
discarded, the best of the next ``--epochs`` is kept.

    python -m bench.loader [--copies 20] [--workers 2] [--batch-size 64] [--k 10]
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import tempfile
import time

import numpy as np


def build_corpus(tmp: str, copies: int) -> str:
    """The scikit-image photos × ``copies`` at 1024 px, built to 256 px shards with tiny-CLIP
    embeddings, tokens and a FAISS index."""
    from bench.shard_stage import make_photos
    from mmdata.build import build
    from mmdata.config import load_config
    from pipelines.demo_corpus import PHOTOS

    root = os.path.join(tmp, "corpus")
    os.makedirs(root)
    make_photos(root, copies * len(PHOTOS))  # make_photos takes the number of images
    out = os.path.join(tmp, "out")
    build(load_config(input=root, out=out, workers=2, image_size=256, samples_per_shard=100, tokenize=True,
                      model="mmdata-tiny", pretrained="random", embed_batch_size=64, progress=False))
    return out


def _identity(x):
    return x


def bare_loader(out: str, transform, batch_size: int, workers: int):
    """webdataset's own pipeline: the same decode and preprocessing, tuples instead of our dict."""
    import webdataset as wds

    urls = sorted(glob.glob(f"{out}/shards/*.tar"))
    ds = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.single_node_only, workersplitter=wds.split_by_worker)
          .shuffle(1000).decode("pil").to_tuple("jpg", "txt").map_tuple(transform, _identity).batched(batch_size))
    return wds.WebLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0)


def one_epoch(loader) -> tuple[float, int]:
    """(seconds, samples) of one pass over ``loader``."""
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch["__key__"])
    return time.perf_counter() - start, n


def interleaved(bare, ours, epochs: int) -> tuple[tuple[float, int], tuple[float, int]]:
    """Best (seconds, samples) of each over ``epochs`` epochs run in turn — bare, ours, bare, … — so
    a change in machine load hits both; the first epoch of each (worker start-up) is discarded."""
    times: dict[str, list] = {"bare": [], "ours": []}
    for e in range(epochs + 1):
        ours.set_epoch(e)
        times["bare"].append(one_epoch(bare))
        times["ours"].append(one_epoch(ours))
    return min(times["bare"][1:]), min(times["ours"][1:])


def neighbour_cost(out: str, batch_size: int, k: int, batches: int = 20) -> dict:
    """Milliseconds per batch of ``NeighbourLookup`` (search B queries for k+1, gather the image and
    text rows of the B×k neighbours), measured in this process after the index is loaded."""
    import faiss

    from mmdata.loader import NeighbourLookup, make_loader

    faiss.omp_set_num_threads(1)  # as in a loader worker (one thread each: the workers are the parallelism)
    lookup = NeighbourLookup(out, k, "image", embeddings=["image", "text"])
    loader = make_loader(out, modalities=[], batch_size=batch_size, num_workers=0, embeddings=["image"])
    sample = [b for _, b in zip(range(batches), loader)]
    lookup(sample[0])  # load the index and the id table once, as a worker does
    start = time.perf_counter()
    for b in sample:
        lookup(b)
    per_batch = (time.perf_counter() - start) / len(sample)
    return {"k": k, "batches": len(sample), "ms_per_batch": per_batch * 1e3}


def large_index_cost(n: int, dim: int, batch_size: int, k: int, batches: int = 20) -> dict:
    """Milliseconds per batch of the neighbour search alone (B queries, k+1 results, one thread as
    in a loader worker) on the index ``build_index`` chooses for ``n`` synthetic clustered vectors
    of dimension ``dim``, at its tuned nprobe: what the lookup costs on a corpus of real size."""
    import faiss

    from bench.index_build import generate
    from mmdata.index import EmbeddingSource, build_index, load_index
    from mmdata.index.evaluate import search

    with tempfile.TemporaryDirectory(prefix="mmdata-bench-nb-") as tmp:
        files = generate(tmp, n, dim, rows_per_file=50_000)
        sources = [EmbeddingSource(p, np.load(ids)) for p, ids in files]
        infos = build_index(sources, os.path.join(tmp, "nb.index"))
        index = load_index(os.path.join(tmp, "nb.index"), infos)
        queries = np.load(files[0][0])[: batch_size * batches].astype(np.float32)
    faiss.omp_set_num_threads(1)
    search(index, queries[:batch_size], k + 1)  # warm
    start = time.perf_counter()
    for i in range(batches):
        search(index, queries[i * batch_size : (i + 1) * batch_size], k + 1)
    per_batch = (time.perf_counter() - start) / batches
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return {"n": n, "dim": dim, "index_key": infos["index_key"], "search_params": infos["search_params_string"],
            "ms_per_batch": per_batch * 1e3}


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=20, help="the scikit-image photos × copies samples")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--index-n", type=int, default=100_000, help="vectors of the large-index lookup (0: skip)")
    args = parser.parse_args()
    from mmdata.loader import make_loader, model_transform

    transform = model_transform("ViT-B-32")  # 224 px, what a real run would feed its model
    tmp = tempfile.mkdtemp(prefix="mmdata-bench-loader-")
    try:
        out = build_corpus(tmp, args.copies)
        bare = bare_loader(out, transform, args.batch_size, args.workers)
        ours = make_loader(out, modalities=["image", "text"], batch_size=args.batch_size, num_workers=args.workers,
                           transform=transform, shuffle_buffer=1000)
        (t_bare, n_bare), (t_ours, n_ours) = interleaved(bare, ours, args.epochs)
        assert n_ours == n_bare == ours.num_samples, (n_ours, n_bare, ours.num_samples)
        nb = neighbour_cost(out, args.batch_size, args.k)
        big = large_index_cost(args.index_n, 512, args.batch_size, args.k) if args.index_n else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ms_batch_ours = t_ours / (n_ours / args.batch_size) * 1e3
    result = {"samples": n_ours, "workers": args.workers, "batch_size": args.batch_size,
              "bare_samples_per_s": n_bare / t_bare, "mmdata_samples_per_s": n_ours / t_ours,
              "ratio": t_bare / t_ours, "neighbours": nb,
              "neighbour_share_of_batch": nb["ms_per_batch"] / (nb["ms_per_batch"] + ms_batch_ours)}
    print(f"loader: {n_ours} samples (256 px JPEG → 224 px tensors), batch {args.batch_size}, {args.workers} workers")
    print(f"  bare webdataset pipeline : {result['bare_samples_per_s']:8.1f} samples/s")
    print(f"  mmdata make_loader       : {result['mmdata_samples_per_s']:8.1f} samples/s  "
          f"(+ embeddings join, json, tokens, dict collation)")
    print(f"  ratio mmdata / bare      : {result['ratio']:.3f}")
    print(f"  neighbours k={args.k}        : {nb['ms_per_batch']:.2f} ms per batch of {args.batch_size} "
          f"({nb['ms_per_batch'] / args.batch_size * 1e3:.0f} µs/sample; "
          f"{result['neighbour_share_of_batch']:.1%} of a batch's time if done in the same worker)")
    if big is not None:
        result["neighbours_large"] = big
        share = big["ms_per_batch"] / (big["ms_per_batch"] + ms_batch_ours)
        print(f"  search on {big['n']:,}×{big['dim']} {big['index_key']} ({big['search_params']}): "
              f"{big['ms_per_batch']:.2f} ms per batch of {args.batch_size}, one thread "
              f"({share:.1%} of a batch's time if done in the same worker)")
    return result


if __name__ == "__main__":
    main()
