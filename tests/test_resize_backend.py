"""resize_backend: OpenCV (INTER_AREA down, INTER_LANCZOS4 up) against Pillow's Lanczos — same
geometry for every mode, source format and orientation, pixels close to the pure-Lanczos result,
the backend in the config hash and the manifest, output byte-identical across engines and workers."""
import glob
import hashlib
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_build
from PIL import Image

from mmdata.config import load_config
from mmdata.errors import UserError
from mmdata.transforms.image import ImageOptions, ImageTransform
from pipelines.demo_corpus import skimage_photo

cv2 = pytest.importorskip("cv2")


def encoded(fmt="JPEG", size=(900, 600), mode="RGB", orientation=1) -> bytes:
    im = skimage_photo("astronaut.png").resize(size).convert(mode)
    buf = io.BytesIO()
    if fmt == "JPEG":
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(buf, "JPEG", quality=92, exif=exif.tobytes())
    else:
        im.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(255 ** 2 / max(float(np.mean((a - b) ** 2)), 1e-12))


@pytest.mark.parametrize("source", [("JPEG", "RGB", 1), ("JPEG", "RGB", 6), ("JPEG", "L", 3), ("JPEG", "CMYK", 1),
                                    ("PNG", "RGBA", 1), ("WEBP", "RGB", 1)])
@pytest.mark.parametrize("resize_mode", ["keep_ratio", "center_crop", "border"])
@pytest.mark.parametrize("codec", ["pillow", "simplejpeg"])
def test_opencv_matches_pillow_geometry_and_stays_close(source, resize_mode, codec):
    if codec == "simplejpeg":
        pytest.importorskip("simplejpeg")
    fmt, mode, orientation = source
    data = encoded(fmt, mode=mode, orientation=orientation)
    opts = dict(size=200, resize_mode=resize_mode, jpeg_codec=codec)
    pil = ImageTransform(ImageOptions(**opts))(data)
    cv = ImageTransform(ImageOptions(**opts, resize_backend="opencv"))(data)
    assert (cv.width, cv.height, cv.orig_width, cv.orig_height, cv.ext) == (
        pil.width, pil.height, pil.orig_width, pil.orig_height, pil.ext)
    a, b = pixels(pil.data), pixels(cv.data)
    assert np.abs(a - b).mean() < 4.0, source  # another filter, the same picture, the same way up
    assert psnr(a, b) > 28.0, source
    again = ImageTransform(ImageOptions(**opts, resize_backend="opencv"))(data)
    assert again.data == cv.data  # deterministic


def test_downscale_is_an_area_average_and_upscale_is_not():
    """512 → 256 of a PNG (no DCT scaling): INTER_AREA is the exact mean of each 2×2 block, which
    Lanczos is not; an upscale (resize_only_if_bigger off) takes Lanczos-4, not a blocky copy."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    down = ImageTransform(ImageOptions(size=256, fmt="png", resize_backend="opencv"))(buf.getvalue())
    blocks = arr.astype(np.float64).reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
    got = pixels(down.data)
    assert np.abs(got - blocks).max() <= 0.5 + 1e-9
    lanczos = pixels(ImageTransform(ImageOptions(size=256, fmt="png"))(buf.getvalue()).data)
    assert np.abs(lanczos - blocks).max() > 5

    small = arr[:64, :64]
    buf = io.BytesIO()
    Image.fromarray(small).save(buf, "PNG")
    up = pixels(ImageTransform(ImageOptions(size=128, fmt="png", resize_backend="opencv"))(buf.getvalue()).data)
    assert up.shape == (128, 128, 3)
    nearest = np.repeat(np.repeat(small.astype(np.float64), 2, axis=0), 2, axis=1)
    assert np.abs(up - nearest).mean() > 5  # interpolated, not repeated pixels


def test_unchanged_images_keep_their_bytes_with_opencv():
    data = encoded("JPEG", size=(200, 300))
    res = ImageTransform(ImageOptions(size=200, resize_backend="opencv"))(data)
    assert res.data == data and not res.reencoded


def test_backend_is_in_the_hash_and_auto_resolves():
    base = dict(input="x", out="y")
    pillow, cv, auto = (load_config(**base, resize_backend=b) for b in ("pillow", "opencv", "auto"))
    assert pillow.config_hash != cv.config_hash
    assert auto.resize_backend == "opencv" and auto.config_hash == cv.config_hash
    assert "resize_backend" not in pillow.content_dict()  # builds made before the option keep their hash
    assert load_config(**base).resize_backend == "opencv"  # the default, auto, takes it when installed
    with pytest.raises(UserError):
        load_config(**base, resize_backend="bicubic")


def test_opencv_without_the_package_is_one_line_and_auto_falls_back():
    script = ("import sys; sys.modules['cv2'] = None\n"  # the package cannot be imported
              "from mmdata.config import load_config\nfrom mmdata.errors import UserError\n"
              "print(load_config(input='x', out='y', resize_backend='auto').resize_backend)\n"
              "try:\n    load_config(input='x', out='y', resize_backend='opencv')\n"
              "except UserError as e:\n    print('refused:', e)\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "pillow"
    assert lines[1].startswith("refused:") and "opencv-python-headless" in lines[1]


def test_opencv_build_is_byte_identical_across_engines(tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    sources = [("JPEG", "RGB", 1), ("JPEG", "RGB", 6), ("JPEG", "L", 3), ("PNG", "RGBA", 1), ("WEBP", "RGB", 1)] * 2
    for i, (fmt, mode, orientation) in enumerate(sources):
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
        (corpus / f"p{i:02d}.{ext}").write_bytes(encoded(fmt, (480 + 8 * i, 360), mode, orientation))
        (corpus / f"p{i:02d}.txt").write_text(f"photo {i}")
    (corpus / "tiny.png").write_bytes(encoded("PNG", (40, 30)))  # upscaled: Lanczos-4
    (corpus / "tiny.txt").write_text("tiny")
    (corpus / "broken.jpg").write_bytes(encoded()[:500])
    (corpus / "broken.txt").write_text("broken")

    def shards(out):
        return {os.path.basename(f): hashlib.sha256(open(f, "rb").read()).hexdigest()
                for f in sorted(glob.glob(f"{out}/shards/*.tar"))}

    kw = dict(image_size=128, samples_per_shard=4, resize_backend="opencv")
    ref = run_build(corpus, tmp_path / "one", workers=1, **kw)
    assert ref["config"]["resize_backend"] == "opencv"
    assert ref["counts"] == {"inputs": 12, "written": 11, "filtered": 0, "failed": 1}
    expected = shards(tmp_path / "one")
    assert len(expected) == 3
    for name, extra in {"two": dict(workers=2), "dask": dict(engine="dask", workers=2)}.items():
        manifest = run_build(corpus, tmp_path / name, **extra, **kw)
        assert shards(tmp_path / name) == expected, name
        assert manifest["counts"] == ref["counts"] and manifest["config_hash"] == ref["config_hash"], name
    pillow = run_build(corpus, tmp_path / "pillow", workers=1, image_size=128, samples_per_shard=4,
                       resize_backend="pillow")
    assert shards(tmp_path / "pillow") != expected and pillow["config_hash"] != ref["config_hash"]
    assert json.load(open(tmp_path / "pillow" / "manifest.json"))["config"]["resize_backend"] == "pillow"


@pytest.mark.parametrize("mode", ["keep_ratio", "center_crop", "border", "no"])
def test_the_array_path_gives_the_pillow_routes_bytes(mode):
    """simplejpeg + OpenCV + jpg keeps the pixels a numpy array from decode to encode; every orientation,
    grey and colour, down and up, odd sizes: the same bytes, sizes and pixels as through Pillow images."""
    pytest.importorskip("simplejpeg")
    cases = [encoded("JPEG", size, colour, o) for o in range(1, 9) for colour in ("RGB", "L")
             for size in ((900, 600), (301, 517))] + [encoded("JPEG", (120, 90)), encoded("JPEG", (255, 256), "L", 6)]
    opts = ImageOptions(size=256, resize_mode=mode, jpeg_codec="simplejpeg", resize_backend="opencv")
    fast, slow = ImageTransform(opts), ImageTransform(opts)
    slow.array_path = False
    assert fast.array_path
    for data in cases:
        a, b = fast(data), slow(data)
        assert (a.data, a.width, a.height, a.orig_width, a.orig_height, a.reencoded) == \
               (b.data, b.width, b.height, b.orig_width, b.orig_height, b.reencoded)
        assert np.array_equal(np.asarray(a.pil()), np.asarray(b.pil()))
    assert not ImageTransform(ImageOptions(jpeg_codec="simplejpeg", resize_backend="opencv", fmt="png")).array_path


def test_bad_inputs_end_alike_on_the_array_path():
    """Zero bytes, a truncated JPEG, garbage after the JPEG marker, a PNG under a .jpg name, a header
    claiming 10^10 pixels: the array path and the Pillow route give the same result or the same reason."""
    pytest.importorskip("simplejpeg")
    from mmdata.errors import SampleFailed, SampleFiltered

    good = encoded("JPEG", (900, 600), "RGB", 6)
    huge = bytearray(good)
    sof = huge.index(b"\xff\xc0")  # baseline frame header: height and width after length and precision
    huge[sof + 5: sof + 9] = (50000).to_bytes(2, "big") * 2
    cases = {"empty": b"", "truncated": good[: len(good) // 2], "garbage": good[:2] + b"\x00" * 500,
             "png_named_jpg": encoded("PNG", (300, 200)), "huge_header": bytes(huge), "no_end": good[:-2]}
    opts = ImageOptions(size=256, jpeg_codec="simplejpeg", resize_backend="opencv", max_pixels=100_000_000)
    fast, slow = ImageTransform(opts), ImageTransform(opts)
    slow.array_path = False

    def outcome(transform, data):
        try:
            res = transform(data)
        except (SampleFailed, SampleFiltered) as exc:
            return type(exc).__name__, exc.reason
        return "written", res.data

    seen = {}
    for name, data in cases.items():
        seen[name] = outcome(fast, data)
        assert seen[name] == outcome(slow, data), name
    assert seen["empty"] == ("SampleFailed", "empty:image")
    assert seen["garbage"][:2] == ("SampleFailed", "decode:image")
    assert seen["huge_header"] == ("SampleFiltered", "max_pixels")
    assert seen["png_named_jpg"][0] == "written"
