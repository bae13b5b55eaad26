"""Augmentation cost per sample, as a fraction of the decode + resize work every sample pays anyway.

Image: the reference is Pillow decoding a real photo (scikit-image's JPEGs, and its PNG photos
re-encoded as JPEG) and resizing it to 256 on the shorter side (JPEG draft scaling + Lanczos, as the
build does); the augmentation runs on that 256 px image. Audio: the reference is soundfile decoding
a FLAC (44.1 kHz stereo, a few seconds) and soxr resampling it to 16 kHz mono; the augmentation
runs on the 16 kHz clip. Pipelines: the issue's three-op image pipeline, and the image and audio
sections of ``pipelines/configs/augment_example.yaml`` (averaged over many keys, so each op counts
by its probability); then each op alone, firing always. One process, ratios from one run.

    python -m bench.augment [--keys 200] [--seconds 5] [--repeat 3]
"""
from __future__ import annotations

import argparse
import io
import math
import os
import time

import numpy as np
import soundfile as sf
import soxr
from PIL import Image

from mmdata.augment import Augmenter, load_augment_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "pipelines", "configs", "augment_example.yaml")
ISSUE_IMAGE = {"image": [
    {"op": "random_resized_crop", "p": 1.0, "scale": [0.5, 1.0]},
    {"op": "horizontal_flip", "p": 0.5},
    {"op": "color_jitter", "p": 0.8, "brightness": 0.3, "contrast": 0.3},
]}
PHOTOS = ["rocket.jpg", "retina.jpg", "hubble_deep_field.jpg", "astronaut.png", "chelsea.png", "coffee.png"]
SR_IN, SR_OUT = 44100, 16000


def photos() -> list[bytes]:
    """Real photos as JPEG bytes (the PNGs re-encoded at quality 95, as a crawl would hold them)."""
    import skimage

    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    out = []
    for name in PHOTOS:
        with open(os.path.join(folder, name), "rb") as fh:
            data = fh.read()
        if not name.endswith(".jpg"):
            buf = io.BytesIO()
            Image.open(io.BytesIO(data)).convert("RGB").save(buf, "JPEG", quality=95)
            data = buf.getvalue()
        out.append(data)
    return out


def decode_resize(data: bytes, side: int = 256) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    scale = side / min(im.size)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    im.draft("RGB", (math.ceil(im.width * scale), math.ceil(im.height * scale)))
    return im.convert("RGB").resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def flac_clips(n: int, seconds: float) -> list[bytes]:
    """Noise-modulated tones (they compress like real audio), 44.1 kHz stereo FLAC."""
    rng = np.random.default_rng(0)
    t = np.arange(int(SR_IN * seconds)) / SR_IN
    out = []
    for i in range(n):
        env = np.abs(np.sin(2 * np.pi * 0.5 * t))[:, None]
        x = 0.3 * env * np.sin(2 * np.pi * (200 + 50 * i) * t)[:, None] + 0.02 * rng.standard_normal((len(t), 2))
        buf = io.BytesIO()
        sf.write(buf, np.clip(x, -1, 1).astype(np.float32), SR_IN, format="FLAC", subtype="PCM_16")
        out.append(buf.getvalue())
    return out


def decode_resample(data: bytes) -> np.ndarray:
    x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return soxr.resample(x.mean(axis=1), sr, SR_OUT, quality="HQ").astype(np.float32)


def timed(jobs: dict, repeat: int) -> dict:
    """Best-of-``repeat`` seconds per item of each ``name: (fn, items)``, the jobs interleaved round
    by round so that a change in machine load hits the references and the augmentations alike."""
    best = {name: math.inf for name in jobs}
    for _ in range(repeat):
        for name, (fn, items) in jobs.items():
            start = time.perf_counter()
            for item in items:
                fn(item)
            best[name] = min(best[name], (time.perf_counter() - start) / len(items))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=200, help="keys per measurement (probabilities average out)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each audio clip")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    keys = [f"sample_{i:05d}" for i in range(args.keys)]

    jpegs = photos()
    resized = [decode_resize(d) for d in jpegs]
    image_items = [(resized[i % len(resized)], k) for i, k in enumerate(keys)]
    flacs = flac_clips(4, args.seconds)
    wavs = [decode_resample(d) for d in flacs]
    audio_items = [(wavs[i % len(wavs)], k) for i, k in enumerate(keys)]
    short = audio_items[: max(8, len(audio_items) // 8)]  # the slow single audio ops on fewer keys

    def image_job(config: dict) -> tuple:
        aug = Augmenter(config)
        return (lambda item: aug.image(item[0], item[1], 1)), image_items

    def audio_job(config: dict, items: list) -> tuple:
        aug = Augmenter(config)
        return (lambda item: aug.audio(item[0], SR_OUT, item[1], 1)), items

    example = load_augment_config(EXAMPLE)
    Augmenter(example).audio(wavs[0], SR_OUT, "warm-up", 1)  # librosa's first-call imports
    jobs = {
        ("ref", "image"): (decode_resize, [jpegs[i % len(jpegs)] for i in range(len(keys))]),
        ("ref", "audio"): (decode_resample, [flacs[i % len(flacs)] for i in range(len(keys) // 4)]),
        ("image", "issue pipeline (crop, flip .5, jitter .8)"): image_job(ISSUE_IMAGE),
        ("image", "augment_example.yaml image (7 ops)"): image_job({"image": list(example.image)}),
        ("audio", "augment_example.yaml audio (7 ops)"): audio_job({"audio": list(example.audio)}, audio_items),
    }
    for op in example.image:
        jobs[("image", f"  {op.op} alone (p=1)")] = image_job({"image": [op.model_copy(update={"p": 1.0})]})
    for op in example.audio:
        jobs[("audio", f"  {op.op} alone (p=1)")] = audio_job({"audio": [op.model_copy(update={"p": 1.0})]}, short)
    cost = timed(jobs, args.repeat)
    ref = {"image": cost[("ref", "image")], "audio": cost[("ref", "audio")]}

    sizes = ", ".join(f"{im.width}x{im.height}" for im in resized)
    print(f"image reference: Pillow decode + resize to 256 of {len(jpegs)} photos ({sizes}): "
          f"{ref['image'] * 1e3:.2f} ms / image")
    print(f"audio reference: soundfile decode + soxr 44.1→16 kHz of {args.seconds:.0f} s stereo FLAC: "
          f"{ref['audio'] * 1e3:.2f} ms / clip")
    print(f"\n{'':6} {'pipeline':44} {'ms/sample':>10} {'fraction of decode+resize':>27}")
    for (modality, name), seconds in cost.items():
        if modality != "ref":
            print(f"{modality:6} {name:44} {seconds * 1e3:10.3f} {seconds / ref[modality]:27.3f}")
    print(f"\nimage augmentation / decode+resize: "
          f"{cost[('image', 'issue pipeline (crop, flip .5, jitter .8)')] / ref['image']:.3f} (issue pipeline), "
          f"{cost[('image', 'augment_example.yaml image (7 ops)')] / ref['image']:.3f} (example yaml)")
    print(f"audio augmentation / decode+resample: "
          f"{cost[('audio', 'augment_example.yaml audio (7 ops)')] / ref['audio']:.3f} (example yaml)")

if __name__ == "__main__":
    main()
