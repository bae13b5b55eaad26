"""How close ``ClipEncoder.encode_images`` (preprocess + forward, overlapped) gets to the forward alone.

For each model: (a) ``encode_images`` on decoded PIL images of mixed sizes (the model's eval
transform in ``prefetch_threads`` threads while the forward runs), (b) ``encode_image_tensors`` on
the same images already preprocessed, same batch size. Prints images/s for both, the ratio a/b
(1.0 = preprocessing fully hidden), and (a) with ``prefetch_threads=0`` to show what the overlap buys.
Random weights (no download); run with ``HF_HUB_OFFLINE=1``.

    HF_HUB_OFFLINE=1 python bench/embed_forward.py [--models mmdata-tiny ViT-B-32] [--n 256]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mmdata.encoders.clip import ClipEncoder  # noqa: E402


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Decoded photos-like inputs of typical shard sizes (shorter side 256-384, mixed aspect)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = int(rng.integers(256, 512)), int(rng.integers(256, 384))
        base = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)  # smooth-ish, not pure noise
        out.append(Image.fromarray(base).resize((w, h), Image.BILINEAR))
    return out


def best_times(fns: dict, repeat: int) -> tuple[dict, float]:
    """Best wall time (s) of each callable over ``repeat`` rounds, interleaved so that background
    load on a shared machine hits every variant alike; also the median per-round ratio b/a."""
    best = {name: float("inf") for name in fns}
    ratios = []
    for _ in range(repeat):
        took = {}
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            took[name] = time.perf_counter() - start
            best[name] = min(best[name], took[name])
        ratios.append(took["b"] / took["a"])
    return best, float(np.median(ratios))


def bench(model: str, images: list[Image.Image], batch_size: int, repeat: int, warm: int) -> None:
    enc = ClipEncoder(model, pretrained=None, batch_size=batch_size, prefetch_threads=2)
    serial = ClipEncoder(model, pretrained=None, batch_size=batch_size, prefetch_threads=0)
    enc.setup()
    serial.setup()
    tensors = torch.stack([enc._loaded.preprocess(im) for im in images])
    # Warm-up: the first forwards of a shape are slow on CPU (oneDNN primitive creation).
    enc.encode_images(images[:warm])
    enc.encode_image_tensors(tensors[:warm])
    n = len(images)
    t, median_ratio = best_times({
        "a": lambda: enc.encode_images(images),
        "b": lambda: enc.encode_image_tensors(tensors),
        "a0": lambda: serial.encode_images(images),
        "pre": lambda: [enc._loaded.preprocess(im) for im in images],
    }, repeat)
    info = enc.info()
    print(f"{model:<12} dim {info['embed_dim']:>4} image {info['image_size']:>3}px  n={n} batch={batch_size} "
          f"device={info['device']} torch threads={torch.get_num_threads()}")
    print(f"  (a) encode_images, prefetch 2    {n / t['a']:9.1f} img/s")
    print(f"  (b) forward alone on tensors     {n / t['b']:9.1f} img/s")
    print(f"      a/b                          {t['b'] / t['a']:9.2f}   (median of per-round ratios {median_ratio:.2f})")
    print(f"  (a0) encode_images, no prefetch  {n / t['a0']:9.1f} img/s   a0/b {t['b'] / t['a0']:.2f}")
    print(f"      preprocess alone, 1 thread   {n / t['pre']:9.1f} img/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mmdata-tiny", "ViT-B-32"])
    parser.add_argument("--n", type=int, default=0, help="images per model (default: 256 tiny, 64 others)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=0, help="timed rounds (default: 4 tiny, 2 others)")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, cuda={torch.cuda.is_available()}")
    for model in args.models:
        tiny = model == "mmdata-tiny"
        n = args.n or (256 if tiny else 64)
        images = make_images(n)
        bench(model, images, args.batch_size, args.repeat or (4 if tiny else 2), warm=n if tiny else args.batch_size)


if __name__ == "__main__":
    main()
