"""Download throughput: `mmdata build` of a URL manifest vs a bare thread-pool downloader + Pillow resize
loop (the limit), both fetching from one local server that adds a fixed latency to every request.

The server (its own process, on 127.0.0.1) answers ``/img/<i>.jpg`` with one of the demo photos
(1024x768 JPEG) after ``--latency-ms`` (50 ms by default, as the web does). The limit runs the same
processes and download threads as mmdata (``--workers`` processes × ``--threads`` threads, one
keep-alive httpx client per process) and does the same decode (JPEG draft) → RGB → resize to 256 →
JPEG encode, writing nothing. Prints images/s for both and the ratio (target ≥ 0.85).

The peer, img2dataset, runs on the same server with the same processes, threads, size and quality
when its side virtualenv ``bench_out/img2dataset-venv`` exists, or is made with
``MMDATA_BENCH_IMG2DATASET=1`` (it pins libraries of its own, so never in the project's venv).

    python -m bench.download [--n 2000] [--threads 16] [--workers N] [--latency-ms 50]
    MMDATA_BENCH_DOWNLOAD_N=20000 make bench      # the issue's size
    MMDATA_BENCH_IMG2DATASET=1 python -m bench.download
"""
from __future__ import annotations

import argparse
import io
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from mmdata.build import build
from mmdata.config import load_config

DEFAULT_N = 2000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_VENV = os.path.join(ROOT, "bench_out", "img2dataset-venv")


def _photos() -> list[bytes]:
    from pipelines.demo_corpus import PHOTOS, jpeg_bytes, skimage_photo

    return [jpeg_bytes(skimage_photo(name).resize((1024, 768))) for name in sorted(PHOTOS)
            if name != "hubble_deep_field.jpg"]


def serve(port_queue, latency_s: float) -> None:
    """The image server: ``/img/<i>.jpg`` → photo ``i mod k`` after ``latency_s``; runs until killed."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    photos = _photos()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            time.sleep(latency_s)
            try:
                body = photos[int(self.path.rsplit("/", 1)[-1].split(".")[0]) % len(photos)]
                code = 200
            except ValueError:
                body, code = b"no", 404
            self.send_response(code)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.request_queue_size = 1024
    srv.handle_error = lambda request, address: None
    port_queue.put(srv.server_address[1])
    srv.serve_forever(poll_interval=0.2)


def resize(data: bytes, size: int = 256) -> int:
    im = Image.open(io.BytesIO(data))
    scale = size / min(im.size)
    im.draft(im.mode, (math.ceil(im.width * scale), math.ceil(im.height * scale)))
    im = ImageOps.exif_transpose(im).convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((round(w * s), round(h * s)), Image.Resampling.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    return len(buf.getvalue())


def bare_chunk(args: tuple[list[str], int]) -> int:
    """One process of the limit: ``threads`` threads each download a URL and resize it."""
    import httpx

    urls, threads = args
    with httpx.Client(limits=httpx.Limits(max_connections=threads, max_keepalive_connections=threads)) as client:
        def one(url: str) -> int:
            resp = client.get(url)
            resp.raise_for_status()
            return resize(resp.content)

        with ThreadPoolExecutor(threads) as pool:
            return sum(1 for _ in pool.map(one, urls))


def bare_loop(urls: list[str], workers: int, threads: int) -> float:
    chunks = [(urls[i::workers], threads) for i in range(workers)]
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        assert sum(pool.map(bare_chunk, chunks)) == len(urls)
    return time.perf_counter() - start


def mmdata_build(src: str, out: str, n: int, workers: int, threads: int) -> float:
    start = time.perf_counter()
    # every URL is on one host here: the per-domain limit (8 by default) is raised to the thread count, so
    # both sides run the same concurrency (politeness has its own tests)
    manifest = build(load_config(input=src, out=out, image_col="url", workers=workers, download_threads=threads,
                                 per_domain_connections=threads,
                                 image_size=256, samples_per_shard=max(50, math.ceil(n / (2 * workers))),
                                 allow_private_addresses=True, progress=False, overwrite=True))
    assert manifest["counts"]["written"] == n, manifest["reasons"]
    return time.perf_counter() - start


def img2dataset_exe() -> str | None:
    """img2dataset's command in its side virtualenv, made when MMDATA_BENCH_IMG2DATASET=1; None if unavailable."""
    exe = os.path.join(PEER_VENV, "bin", "img2dataset")
    if not os.path.exists(exe) and os.environ.get("MMDATA_BENCH_IMG2DATASET") == "1":
        print("  making bench_out/img2dataset-venv (pip install img2dataset) …", flush=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", PEER_VENV], check=True, timeout=300)
            subprocess.run([os.path.join(PEER_VENV, "bin", "pip"), "install", "-q", "img2dataset"], check=True,
                           timeout=1800, stdout=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"  img2dataset: could not be installed ({exc})")
    return exe if os.path.exists(exe) else None


def img2dataset_run(exe: str, src: str, out: str, n: int, workers: int, threads: int) -> float | None:
    """Wall seconds of img2dataset on the same URLs (resize to 256, keep_ratio, JPEG 95), or None if it failed."""
    cmd = [exe, f"--url_list={src}", "--input_format=parquet", "--url_col=url", "--caption_col=caption",
           f"--output_folder={out}", "--output_format=webdataset", f"--processes_count={workers}",
           f"--thread_count={threads}", "--image_size=256", "--resize_mode=keep_ratio", "--encode_quality=95",
           f"--number_sample_per_shard={max(50, math.ceil(n / (4 * workers)))}", "--distributor=multiprocessing",
           "--retries=0", "--timeout=20", "--enable_wandb=False"]
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", PYTHONPATH="")
    start = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    took = time.perf_counter() - start
    if res.returncode != 0:
        print(f"  img2dataset failed: {res.stderr.strip().splitlines()[-1:] or res.returncode}")
        return None
    return took


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=int(os.environ.get("MMDATA_BENCH_DOWNLOAD_N", DEFAULT_N)))
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--threads", type=int, default=16, help="download threads per process")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    server = ctx.Process(target=serve, args=(ports, args.latency_ms / 1000), daemon=True)
    server.start()
    tmp = tempfile.mkdtemp(prefix="mmdata-bench-download-")
    try:
        port = ports.get(timeout=120)
        urls = [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(args.n)]
        src = os.path.join(tmp, "urls.parquet")
        pq.write_table(pa.table({"url": urls, "caption": [f"photo {i}" for i in range(args.n)]}), src)
        bare_loop(urls[:64], args.workers, args.threads)  # warm the server and the pool start-up path
        t_bare = bare_loop(urls, args.workers, args.threads)
        t_mm = mmdata_build(src, os.path.join(tmp, "out"), args.n, args.workers, args.threads)
        exe = img2dataset_exe()
        t_peer = img2dataset_run(exe, src, os.path.join(tmp, "i2d"), args.n, args.workers, args.threads) if exe else None
    finally:
        server.kill()
        server.join(10)
        shutil.rmtree(tmp, ignore_errors=True)
    n = args.n
    result = {"urls": n, "workers": args.workers, "threads": args.threads, "latency_ms": args.latency_ms,
              "bare_images_per_s": n / t_bare, "mmdata_images_per_s": n / t_mm, "ratio": t_bare / t_mm, "target": 0.85}
    print(f"download: {n} image URLs, {args.latency_ms:g} ms latency each, {args.workers} processes × "
          f"{args.threads} threads, → 256 px JPEG")
    print(f"  bare thread-pool + Pillow (limit): {result['bare_images_per_s']:8.1f} images/s")
    print(f"  mmdata build (local)             : {result['mmdata_images_per_s']:8.1f} images/s")
    print(f"  ratio mmdata / limit             : {result['ratio']:.3f}  (target ≥ {result['target']})")
    if t_peer is not None:
        result.update(img2dataset_images_per_s=n / t_peer, ratio_vs_img2dataset=t_peer / t_mm)
        print(f"  img2dataset (peer)               : {result['img2dataset_images_per_s']:8.1f} images/s")
        print(f"  ratio mmdata / img2dataset       : {result['ratio_vs_img2dataset']:.3f}")
    else:
        print("  img2dataset (peer)               : not run (MMDATA_BENCH_IMG2DATASET=1 installs it in bench_out/)")
    return result


if __name__ == "__main__":
    main()
