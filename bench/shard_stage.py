"""Shard stage throughput: `mmdata build` (local engine) vs a bare Pillow loop (the limit).

The limit does the same decode (with JPEG draft) → EXIF/RGB → resize to 256 → JPEG encode in one
process per core, reading the same files, writing nothing. Prints samples/s for both and the
ratio (target ≥ 0.85).

    python -m bench.shard_stage [--copies 12] [--workers N]
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import shutil
import tempfile
import time

from PIL import Image, ImageOps

from mmdata.build import build
from mmdata.config import load_config
from pipelines.demo_corpus import PHOTOS, jpeg_bytes, skimage_photo


def make_photos(root: str, copies: int) -> list[str]:
    """Real photos (scikit-image's), replicated ``copies`` times as JPEG + caption pairs."""
    paths = []
    for name, (stem, caption) in sorted(PHOTOS.items()):
        data = jpeg_bytes(skimage_photo(name).resize((1024, 768)) if name != "hubble_deep_field.jpg" else skimage_photo(name))
        for c in range(copies):
            path = os.path.join(root, f"{stem.replace('/', '_')}_{c:04d}")
            with open(path + ".jpg", "wb") as fh:
                fh.write(data)
            with open(path + ".txt", "w") as fh:
                fh.write(caption)
            paths.append(path + ".jpg")
    return paths


def bare_one(path: str) -> int:
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path[:-4] + ".txt", "rb") as fh:
        fh.read()
    im = Image.open(__import__("io").BytesIO(data))
    scale = 256 / min(im.size)
    im.draft(im.mode, (math.ceil(im.width * scale), math.ceil(im.height * scale)))
    im = ImageOps.exif_transpose(im).convert("RGB")
    w, h = im.size
    s = 256 / min(w, h)
    im = im.resize((round(w * s), round(h * s)), Image.Resampling.LANCZOS, reducing_gap=3.0)
    buf = __import__("io").BytesIO()
    im.save(buf, "JPEG", quality=95)
    return len(buf.getvalue())


def bare_loop(paths: list[str], workers: int) -> float:
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(bare_one, paths, chunksize=16)
    return time.perf_counter() - start


def mmdata_build(root: str, out: str, workers: int) -> float:
    start = time.perf_counter()
    manifest = build(load_config(input=root, out=out, workers=workers, image_size=256, samples_per_shard=100,
                                 progress=False, overwrite=True))
    assert manifest["counts"]["failed"] == 0
    return time.perf_counter() - start


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=60)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="mmdata-bench-")
    try:
        root = os.path.join(tmp, "corpus")
        os.makedirs(root)
        paths = make_photos(root, args.copies)
        n = len(paths)
        bare_loop(paths[:64], args.workers)  # warm the page cache and the pool start-up path
        t_bare = min(bare_loop(paths, args.workers) for _ in range(2))
        t_mm = min(mmdata_build(root, os.path.join(tmp, "out"), args.workers) for _ in range(2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"samples": n, "workers": args.workers, "bare_samples_per_s": n / t_bare, "mmdata_samples_per_s": n / t_mm,
              "ratio": t_bare / t_mm, "target": 0.85}
    print(f"shard stage: {n} photos → 256 px JPEG, {args.workers} workers")
    print(f"  bare Pillow loop (limit): {result['bare_samples_per_s']:8.1f} samples/s")
    print(f"  mmdata build (local)    : {result['mmdata_samples_per_s']:8.1f} samples/s")
    print(f"  ratio mmdata / limit    : {result['ratio']:.3f}  (target ≥ {result['target']})")
    return result


if __name__ == "__main__":
    main()
