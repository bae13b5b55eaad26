"""Shard stage throughput on the same photos, in one run: `mmdata build` (local engine, both JPEG
codecs, both resize backends), the bare loops that match them, and img2dataset 1.47.

The bare loops do decode (with DCT scaling) → EXIF/RGB → resize to 256 (shorter side) → JPEG q95
in one spawned process per worker, reading the same files, writing nothing; start-up included.
Each mmdata mode has its loop with the same codec and the same resize (Pillow's Lanczos, or
OpenCV's INTER_AREA as in img2dataset), so each ratio compares like with like. img2dataset runs in a side virtualenv (bench_out/i2d-venv, created on first use; it pins
pyarrow < 18, so never the project's venv), reading the same files through file:// URLs in a parquet.
Ratios: mmdata / img2dataset (target ≥ 2) and mmdata / the fastest bare loop (target ≥ 0.85).

Each mmdata build runs in a fresh interpreter, timed around build(), so no mode inherits what an
earlier one imported. The machine is shared: --repeat N interleaves N rounds and reports medians.

    python -m bench.shard_stage [--images 768] [--workers N] [--repeat N]
    (SHARD_STAGE_IMAGES=3072, SHARD_STAGE_REPEAT=3 for the big run)
"""
from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from PIL import Image, ImageOps

# mmdata is not imported here: the pools' spawned workers import this module, and the bare loops'
# workers must not pay for importing mmdata (mmdata_build runs each build in its own interpreter)

I2D_VERSION = "1.47"
VENV = os.path.join("bench_out", "i2d-venv")
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}


def make_photos(root: str, n: int) -> list[str]:
    """``n`` JPEG + caption pairs: scikit-image's real photos, cycled."""
    from pipelines.demo_corpus import PHOTOS, jpeg_bytes, skimage_photo

    photos = []
    for name, (stem, caption) in sorted(PHOTOS.items()):
        im = skimage_photo(name)
        photos.append((stem.replace("/", "_"), caption, jpeg_bytes(im if name == "hubble_deep_field.jpg" else im.resize((1024, 768)))))
    paths = []
    for i in range(n):
        stem, caption, data = photos[i % len(photos)]
        path = os.path.join(root, f"{stem}_{i:05d}")
        with open(path + ".jpg", "wb") as fh:
            fh.write(data)
        with open(path + ".txt", "w") as fh:
            fh.write(caption)
        paths.append(path + ".jpg")
    return paths


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path[:-4] + ".txt", "rb") as fh:
        fh.read()
    return data


def _fit(im: Image.Image) -> Image.Image:
    w, h = im.size
    s = 256 / min(w, h)
    return im.resize((round(w * s), round(h * s)), Image.Resampling.LANCZOS, reducing_gap=3.0)


def _fit_cv(im: Image.Image) -> Image.Image:
    import cv2
    import numpy as np

    cv2.setNumThreads(1)
    w, h = im.size
    s = 256 / min(w, h)
    return Image.fromarray(cv2.resize(np.asarray(im), (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA), "RGB")


def bare_one(path: str) -> int:
    """The bare Pillow loop: draft → EXIF transpose → RGB → fit → JPEG q95."""
    im = Image.open(io.BytesIO(_read(path)))
    scale = 256 / min(im.size)
    im.draft(im.mode, (math.ceil(im.width * scale), math.ceil(im.height * scale)))
    im = _fit(ImageOps.exif_transpose(im).convert("RGB"))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    return len(buf.getvalue())


def turbo_one(path: str, fit=_fit) -> int:
    """The bare libjpeg-turbo loop: scaled decode (1/8 steps) → EXIF transpose → fit → JPEG q95."""
    import numpy as np
    import simplejpeg

    data = _read(path)
    head = Image.open(io.BytesIO(data))  # header only: size and EXIF orientation
    scale = 256 / min(head.size)
    arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=math.ceil(head.width * scale),
                                 min_height=math.ceil(head.height * scale))
    im = Image.fromarray(arr, "RGB")
    orientation = head.getexif().get(0x0112, 1)
    if orientation in TRANSPOSE:
        im = im.transpose(TRANSPOSE[orientation])
    im = fit(im)
    return len(simplejpeg.encode_jpeg(np.asarray(im), quality=95, colorspace="RGB", colorsubsampling="420"))


def turbo_cv_one(path: str) -> int:
    """The libjpeg-turbo loop with OpenCV's INTER_AREA for the resize."""
    return turbo_one(path, _fit_cv)


def children_cpu() -> float:
    """CPU seconds of this process's finished children (and theirs): a measure the machine's other
    load moves far less than wall time."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def pool_loop(fn, paths: list[str], workers: int) -> float:
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(fn, paths, chunksize=16)
    return time.perf_counter() - start


# Each mmdata build runs in a fresh interpreter, timed around build() (after `import mmdata`, as the
# loops are timed after the bench's own imports): what the driver imports during a build (pyarrow's
# pandas when planning) is counted every time, not only for the first mode.
BUILD = """
import json, sys, time
from mmdata.build import build
from mmdata.config import load_config
root, out, workers, codec, resize = sys.argv[1:]
start = time.perf_counter()
manifest = build(load_config(input=root, out=out, workers=int(workers), image_size=256, samples_per_shard=100,
                             progress=False, overwrite=True, jpeg_codec=codec, resize_backend=resize))
print(json.dumps({"seconds": time.perf_counter() - start, "counts": manifest["counts"], "reasons": manifest["reasons"]}))
"""


def mmdata_build(root: str, out: str, workers: int, codec: str, resize: str) -> float:
    res = subprocess.run([sys.executable, "-c", BUILD, root, out, str(workers), codec, resize],
                         check=True, capture_output=True, text=True)
    facts = json.loads(res.stdout.strip().splitlines()[-1])
    assert facts["counts"]["failed"] == 0, facts["reasons"]
    return facts["seconds"]


def img2dataset_venv() -> tuple[str | None, str]:
    """The side virtualenv's img2dataset command, or (None, why not)."""
    exe = os.path.join(VENV, "bin", "img2dataset")
    if not os.path.exists(exe):
        try:
            subprocess.run([sys.executable, "-m", "venv", "--clear", VENV], check=True, capture_output=True, text=True)
            subprocess.run([os.path.join(VENV, "bin", "pip"), "install", "-q", f"img2dataset=={I2D_VERSION}"],
                           check=True, capture_output=True, text=True, timeout=900)
        except (subprocess.SubprocessError, OSError) as exc:
            tail = (getattr(exc, "stderr", "") or str(exc)).strip().splitlines()[-3:]
            return None, f"cannot install img2dataset {I2D_VERSION} in {VENV}: {' | '.join(tail)}"
    return exe, ""


def img2dataset_run(exe: str, paths: list[str], tmp: str, workers: int) -> tuple[float, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = os.path.join(tmp, "urls.parquet")
    captions = []
    for p in paths:
        with open(p[:-4] + ".txt") as fh:
            captions.append(fh.read())
    pq.write_table(pa.table({"url": ["file://" + os.path.abspath(p) for p in paths], "caption": captions}), urls)
    out = os.path.join(tmp, "i2d")
    shutil.rmtree(out, ignore_errors=True)  # a new output every round (img2dataset would skip finished shards)
    start = time.perf_counter()
    subprocess.run([exe, "--url_list", urls, "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
                    "--output_format", "webdataset", "--output_folder", out, "--processes_count", str(workers),
                    "--thread_count", "4", "--image_size", "256", "--resize_mode", "keep_ratio", "--encode_quality", "95",
                    "--number_sample_per_shard", "100", "--enable_wandb", "False"],
                   check=True, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    stats = [os.path.join(out, f) for f in os.listdir(out) if f.endswith("_stats.json")]
    return elapsed, sum(json.load(open(f)).get("successes", 0) for f in stats)


# mmdata's modes: (jpeg_codec, resize_backend) and the bare loop doing the same work
MODES = {("pillow", "pillow"): "bare Pillow loop", ("simplejpeg", "pillow"): "bare libjpeg-turbo loop",
         ("simplejpeg", "opencv"): "bare libjpeg-turbo + OpenCV loop"}
LOOPS = {"bare Pillow loop": bare_one, "bare libjpeg-turbo loop": turbo_one,
         "bare libjpeg-turbo + OpenCV loop": turbo_cv_one}


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=int(os.environ.get("SHARD_STAGE_IMAGES", "768")))
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=int(os.environ.get("SHARD_STAGE_REPEAT", "1")),
                        help="rounds of every measurement, interleaved; each rate is the median over rounds")
    args = parser.parse_args()
    n, w = args.images, args.workers
    tmp = tempfile.mkdtemp(prefix="mmdata-bench-")
    rounds: dict[str, list[float]] = {}
    cpu_ms: dict[str, list[float]] = {}  # CPU milliseconds per image, all processes of the run
    why_no_i2d = ""
    try:
        root = os.path.join(tmp, "corpus")
        os.makedirs(root)
        paths = make_photos(root, n)
        pool_loop(bare_one, paths[:64], w)  # warm the page cache
        exe, why_no_i2d = img2dataset_venv()
        for _ in range(max(1, args.repeat)):
            for name, fn in LOOPS.items():
                cpu = children_cpu()
                rounds.setdefault(name, []).append(n / pool_loop(fn, paths, w))
                cpu_ms.setdefault(name, []).append(1000 * (children_cpu() - cpu) / n)
            for codec, resize in MODES:
                cpu = children_cpu()
                seconds = mmdata_build(root, os.path.join(tmp, "out"), w, codec, resize)
                rounds.setdefault(f"mmdata build ({codec}, {resize})", []).append(n / seconds)
                cpu_ms.setdefault(f"mmdata build ({codec}, {resize})", []).append(1000 * (children_cpu() - cpu) / n)
            if exe:
                try:
                    cpu = children_cpu()
                    seconds, ok = img2dataset_run(exe, paths, tmp, w)
                    rounds.setdefault(f"img2dataset {I2D_VERSION}", []).append(n / seconds)
                    cpu_ms.setdefault(f"img2dataset {I2D_VERSION}", []).append(1000 * (children_cpu() - cpu) / n)
                    if ok != n:
                        why_no_i2d = f"img2dataset wrote {ok} of {n} images"
                except subprocess.CalledProcessError as exc:
                    why_no_i2d = "img2dataset failed: " + " | ".join((exc.stderr or "").strip().splitlines()[-3:])
                    exe = None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rate = {name: statistics.median(r) for name, r in rounds.items()}
    cpu = {name: statistics.median(c) for name, c in cpu_ms.items()}
    print(f"shard stage: {n} photos → 256 px JPEG q95, {w} workers, start-up included"
          + (f", median of {args.repeat} interleaved rounds" if args.repeat > 1 else ""))
    for name, r in rate.items():
        print(f"  {name:40s}: {r:8.1f} images/s  {cpu[name]:6.2f} CPU ms/image")
    i2d = rate.get(f"img2dataset {I2D_VERSION}")
    limit = max(rate[name] for name in LOOPS)
    result = {"images": n, "workers": w, "repeat": args.repeat, "rates": rate, "rounds": rounds, "cpu_ms_per_image": cpu, "target_loop": 0.85, "target_img2dataset": 2.0, "modes": {}}
    for (codec, resize), loop in MODES.items():
        mm = rate[f"mmdata build ({codec}, {resize})"]
        mode = {"vs_own_loop": mm / rate[loop], "vs_fastest_loop": mm / limit}
        line = f"  mmdata ({codec}, {resize}) / its loop {mm / rate[loop]:.3f}, / fastest loop {mm / limit:.3f}"
        if i2d:
            mode["vs_img2dataset"] = mm / i2d
            line += f", / img2dataset {mm / i2d:.2f}"
        result["modes"][f"{codec}+{resize}"] = mode
        print(line)
    best = max(rate[f"mmdata build ({c}, {r})"] for c, r in MODES)
    result["ratio_vs_fastest_loop"] = best / limit
    print(f"  best mmdata / fastest bare loop: {best / limit:.3f}  (target ≥ 0.85)")
    if i2d:
        result["ratio_vs_img2dataset"] = best / i2d
        print(f"  best mmdata / img2dataset      : {best / i2d:.2f}  (target ≥ 2)")
    mm, loop = cpu["mmdata build (simplejpeg, opencv)"], cpu[MODES[("simplejpeg", "opencv")]]
    result["cpu_loop_over_mmdata"] = loop / mm
    line = f"  CPU per image, default mode: its loop {loop:.2f} ms / mmdata {mm:.2f} ms = {loop / mm:.3f}"
    if f"img2dataset {I2D_VERSION}" in cpu:
        result["cpu_img2dataset_over_mmdata"] = cpu[f"img2dataset {I2D_VERSION}"] / mm
        line += f"; img2dataset / mmdata {cpu[f'img2dataset {I2D_VERSION}'] / mm:.2f}"
    print(line + "  (load-robust: the machine's other work moves it far less than wall time)")
    if why_no_i2d:
        print(f"  img2dataset: {why_no_i2d}")
    return result


if __name__ == "__main__":
    main()
