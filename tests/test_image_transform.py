import io

import numpy as np
import pytest
from PIL import Image

from mmdata.errors import SampleFailed, SampleFiltered
from mmdata.transforms.image import ImageOptions, ImageTransform
from pipelines.demo_corpus import huge_header_png


def enc(im, fmt="JPEG", **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(w=640, h=480):
    rng = np.random.default_rng(0)
    arr = (rng.random((h, w, 3)) * 40).astype(np.uint8) + np.linspace(0, 200, w, dtype=np.uint8)[None, :, None]
    return Image.fromarray(arr)


def out_image(result):
    im = Image.open(io.BytesIO(result.data))
    im.load()
    return im


@pytest.mark.parametrize("mode,expected", [("keep_ratio", (341, 256)), ("center_crop", (256, 256)),
                                           ("border", (256, 256)), ("no", (640, 480))])
def test_resize_modes(mode, expected):
    res = ImageTransform(ImageOptions(size=256, resize_mode=mode))(enc(photo()))
    assert (res.width, res.height) == expected == out_image(res).size
    assert (res.orig_width, res.orig_height) == (640, 480)


def test_border_pads_black_and_keeps_content_centred():
    res = ImageTransform(ImageOptions(size=256, resize_mode="border", fmt="png"))(enc(photo(), "PNG"))
    arr = np.asarray(out_image(res))
    assert arr[0].max() == 0 and arr[-1].max() == 0  # padded rows
    assert arr[128].max() > 0


def test_unchanged_image_keeps_its_bytes():
    data = enc(photo(256, 300))
    res = ImageTransform(ImageOptions(size=256, resize_mode="keep_ratio"))(data)
    assert res.data == data and not res.reencoded
    res = ImageTransform(ImageOptions(size=256, fmt="png"))(data)
    assert res.reencoded and out_image(res).format == "PNG"


def test_only_if_bigger_leaves_small_images():
    res = ImageTransform(ImageOptions(size=256, resize_mode="center_crop", only_if_bigger=True))(enc(photo(100, 80)))
    assert (res.width, res.height) == (100, 80)


def test_jpeg_draft_gives_the_same_size_and_close_pixels():
    big = photo(4000, 3000)
    res = ImageTransform(ImageOptions(size=256, resize_mode="center_crop", fmt="png"))(enc(big, quality=95))
    direct = big.resize((341, 256), Image.Resampling.LANCZOS).crop((42, 0, 298, 256))
    diff = np.abs(np.asarray(out_image(res), dtype=int) - np.asarray(direct, dtype=int)).mean()
    assert (res.width, res.height) == (256, 256) and diff < 8


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "L", "1", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    base = photo(64, 48)
    if mode in ("I;16", "I"):
        im = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)).convert(mode)
    elif mode == "F":
        im = Image.fromarray(np.asarray(base.convert("L"), dtype=np.float32) / 255.0)
    else:
        im = base.convert(mode)
    fmt = "TIFF" if mode in ("F", "I", "CMYK") else "PNG"
    res = ImageTransform(ImageOptions(size=32, fmt="png"))(enc(im, fmt))
    out = out_image(res)
    assert out.mode == "RGB" and min(out.size) == 32
    if mode in ("I;16", "I", "F", "L"):
        arr = np.asarray(out, dtype=int)
        assert 60 < arr.mean() < 200, arr.mean()  # scaled to 8 bits, not clipped to white or black


def test_transparency_composited_on_white():
    im = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    out = out_image(ImageTransform(ImageOptions(size=40, fmt="png"))(enc(im, "PNG")))
    assert out.getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_applied():
    im = photo(60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    res = ImageTransform(ImageOptions(size=40, resize_mode="keep_ratio"))(enc(im, exif=exif))
    assert (res.orig_width, res.orig_height) == (40, 60) and (res.width, res.height) == (40, 60)


@pytest.mark.parametrize("data,error,reason", [
    (b"", SampleFailed, "empty:image"),
    (b"GIF89a" + b"\0" * 5, SampleFailed, "decode:image"),
    (b"plain text, not an image" * 10, SampleFailed, "decode:image"),
    (huge_header_png(), SampleFiltered, "max_pixels"),
    (huge_header_png(20000, 20000), SampleFiltered, "max_pixels"),
])
def test_bad_bytes(data, error, reason):
    with pytest.raises(error) as exc:
        ImageTransform(ImageOptions())(data)
    assert exc.value.reason == reason


def test_truncated_jpeg_fails_even_when_bytes_would_be_kept():
    data = enc(photo(256, 300))
    for opts in (ImageOptions(size=256), ImageOptions(size=64)):
        with pytest.raises(SampleFailed, match="decode:image"):
            ImageTransform(opts)(data[: len(data) // 2])


def test_filters():
    with pytest.raises(SampleFiltered, match="min_side"):
        ImageTransform(ImageOptions(min_side=100))(enc(photo(200, 50)))
    with pytest.raises(SampleFiltered, match="max_aspect_ratio"):
        ImageTransform(ImageOptions(max_aspect_ratio=3))(enc(photo(400, 50)))
    with pytest.raises(SampleFiltered, match="max_pixels"):
        ImageTransform(ImageOptions(max_pixels=1000))(enc(photo(100, 100)))


def test_webp_output_and_quality():
    data = enc(photo())
    hi = ImageTransform(ImageOptions(fmt="webp", quality=95))(data)
    lo = ImageTransform(ImageOptions(fmt="webp", quality=20))(data)
    assert out_image(hi).format == "WEBP" and len(lo.data) < len(hi.data)
