"""jpeg_codec: simplejpeg (libjpeg-turbo) against Pillow on the same photos — same geometry and
orientation, pixels close, grey and CMYK handled, broken files fail the same way; the codec is in the
config hash and the manifest; a simplejpeg build is byte-identical across engines and worker counts."""
import glob
import hashlib
import io
import json
import os

import numpy as np
import pytest
from conftest import run_build
from PIL import Image

from mmdata.config import load_config
from mmdata.errors import SampleFailed, UserError
from mmdata.transforms.image import ImageOptions, ImageTransform
from pipelines.demo_corpus import skimage_photo

simplejpeg = pytest.importorskip("simplejpeg")


def photo_jpeg(mode="RGB", orientation=1, size=(900, 600)) -> bytes:
    im = skimage_photo("astronaut.png").resize(size).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("resize_mode", ["keep_ratio", "center_crop", "border"])
def test_simplejpeg_matches_pillow_geometry_and_pixels(mode, orientation, resize_mode):
    data = photo_jpeg(mode, orientation)
    pil = ImageTransform(ImageOptions(size=200, resize_mode=resize_mode))(data)
    sj = ImageTransform(ImageOptions(size=200, resize_mode=resize_mode, jpeg_codec="simplejpeg"))(data)
    assert (sj.width, sj.height, sj.orig_width, sj.orig_height) == (pil.width, pil.height, pil.orig_width, pil.orig_height)
    assert (sj.source_format, sj.reencoded, sj.ext) == ("JPEG", True, "jpg")
    a, b = pixels(pil.data), pixels(sj.data)
    assert a.shape == b.shape
    assert np.abs(a - b).mean() < 4.0, (mode, orientation)  # another DCT scale, the same picture, the same way up
    # a wrong orientation would differ far more than that: the test can tell
    if orientation == 3:
        upright = pixels(ImageTransform(ImageOptions(size=200, resize_mode=resize_mode))(photo_jpeg(mode, 1)).data)
        assert np.abs(a - upright).mean() > 4.0
    assert ImageTransform(ImageOptions(size=200, resize_mode=resize_mode, jpeg_codec="simplejpeg"))(data).data == sj.data


def test_simplejpeg_decodes_at_a_finer_dct_scale():
    """1024 px → 256: Pillow's draft stops at 1/2 (512), libjpeg-turbo's scaling at 3/8 (384)."""
    data = photo_jpeg(size=(1024, 768))
    h, w = simplejpeg.decode_jpeg(data, min_width=342, min_height=256).shape[:2]
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (342, 256))
    assert (w, h) == (384, 288) and im.size == (512, 384)


def test_broken_jpegs_fail_with_simplejpeg_too():
    data = photo_jpeg()
    t = ImageTransform(ImageOptions(size=128, jpeg_codec="simplejpeg"))
    for bad in (data[: len(data) // 2], data[:-2], data[:400]):
        with pytest.raises(SampleFailed) as err:
            t(bad)
        assert err.value.reason == "decode:image"


def test_png_and_webp_output_stay_with_pillow():
    data = photo_jpeg()
    for fmt in ("png", "webp"):
        a = ImageTransform(ImageOptions(size=128, fmt=fmt))(data)
        b = ImageTransform(ImageOptions(size=128, fmt=fmt, jpeg_codec="simplejpeg"))(data)
        assert a.ext == b.ext == fmt and (a.width, a.height) == (b.width, b.height)
        assert np.abs(pixels(a.data) - pixels(b.data)).mean() < 4.0


def test_codec_is_in_the_hash_and_auto_resolves():
    base = dict(input="x", out="y")
    pillow, sj, auto = (load_config(**base, jpeg_codec=c) for c in ("pillow", "simplejpeg", "auto"))
    assert pillow.config_hash != sj.config_hash
    assert auto.jpeg_codec == "simplejpeg" and auto.config_hash == sj.config_hash
    assert "jpeg_codec" not in pillow.content_dict()  # builds made before the option keep their hash
    assert load_config(**base).jpeg_codec == "simplejpeg"  # the default, auto, takes it when installed
    with pytest.raises(UserError):
        load_config(**base, jpeg_codec="turbo")


def test_simplejpeg_build_is_byte_identical_across_engines(tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    for i, (mode, orientation) in enumerate([("RGB", 1), ("RGB", 6), ("L", 3), ("CMYK", 1)] * 3):
        (corpus / f"p{i:02d}.jpg").write_bytes(photo_jpeg(mode, orientation, size=(640 + 8 * i, 480)))
        (corpus / f"p{i:02d}.txt").write_text(f"photo {i}")
    (corpus / "broken.jpg").write_bytes(photo_jpeg()[:500])
    (corpus / "broken.txt").write_text("broken")

    def shards(out):
        return {os.path.basename(f): hashlib.sha256(open(f, "rb").read()).hexdigest()
                for f in sorted(glob.glob(f"{out}/shards/*.tar"))}

    kw = dict(image_size=128, samples_per_shard=4, jpeg_codec="simplejpeg")
    ref = run_build(corpus, tmp_path / "one", workers=1, **kw)
    assert ref["config"]["jpeg_codec"] == "simplejpeg"
    assert ref["counts"] == {"inputs": 13, "written": 12, "filtered": 0, "failed": 1}
    expected = shards(tmp_path / "one")
    assert len(expected) == 4
    for name, extra in {"two": dict(workers=2), "dask": dict(engine="dask", workers=2)}.items():
        manifest = run_build(corpus, tmp_path / name, **extra, **kw)
        assert shards(tmp_path / name) == expected, name
        assert manifest["counts"] == ref["counts"] and manifest["config_hash"] == ref["config_hash"], name
    pillow = run_build(corpus, tmp_path / "pillow", workers=1, image_size=128, samples_per_shard=4, jpeg_codec="pillow")
    assert shards(tmp_path / "pillow") != expected and pillow["config_hash"] != ref["config_hash"]
    assert json.load(open(tmp_path / "pillow" / "manifest.json"))["config"]["jpeg_codec"] == "pillow"
