"""Write a small sample corpus: scikit-image's bundled photos with captions, in several formats
and colour modes, plus the broken files a real corpus has. Used by ``make demo``, the tests and
the benchmarks.

    python -m pipelines.demo_corpus OUT_DIR [--copies N]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import struct
import zlib

import numpy as np
from PIL import Image

PHOTOS = {
    "astronaut.png": ("space/astronaut", "an astronaut in a white spacesuit in front of a flag"),
    "hubble_deep_field.jpg": ("space/hubble", "galaxies scattered across the deep field of space"),
    "moon.png": ("space/moon", "craters on the grey surface of the moon"),
    "rocket.jpg": ("space/rocket", "a rocket standing on its launch pad"),
    "chelsea.png": ("animals/chelsea", "a tabby cat looking to the side"),
    "horse.png": ("animals/horse", "the silhouette of a horse"),
    "coffee.png": ("food/coffee", "a cup of coffee on a saucer"),
    "camera.png": ("people/cameraman", "a black and white photo of a man behind a camera on a tripod"),
    "coins.png": ("things/coins", "old coins on a dark background"),
    "motorcycle_left.png": ("things/motorcycle", "a motorcycle parked in a garage"),
    "logo.png": ("things/logo", "the scikit-image logo"),
    "chessboard_RGB.png": ("things/chessboard", "a black and white chessboard pattern"),
    "brick.png": ("textures/brick", "a brick wall"),
    "grass.png": ("textures/grass", "a close-up of grass"),
    "gravel.png": ("textures/gravel", "a close-up of gravel"),
    "ihc.png": ("science/ihc", "a stained tissue sample under a microscope"),
    "retina.jpg": ("science/retina", "a photograph of a human retina"),
    "cell.png": ("science/cell", "a cell seen under a microscope"),
    "page.png": ("documents/page", "a scanned page of printed text"),
    "clock_motion.png": ("things/clock", "a clock blurred by motion"),
}

# Files a real corpus has and that must end as 'filtered' or 'failed' with a reason.
BROKEN = {
    "broken/truncated.jpg": "decode:image",
    "broken/zero_bytes.jpg": "empty:image",
    "broken/huge_header.png": "max_pixels",
    "broken/not_an_image.jpg": "decode:image",
    "broken/binary_caption.jpg": "decode:text",
    "broken/caption_only.txt": "missing:image",
    "broken/unsupported.xyz": "unsupported:xyz",
    "broken/bad_metadata.jpg": "decode:json",
}


def skimage_photo(name: str) -> Image.Image:
    import skimage

    return Image.open(os.path.join(os.path.dirname(skimage.__file__), "data", name))


def huge_header_png(width: int = 65500, height: int = 65500) -> bytes:
    """A PNG whose header claims ``width`` × ``height`` pixels, followed by almost no data."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _write(root: str, rel: str, data: bytes | str) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)


def make_corpus(root: str, copies: int = 1) -> dict:
    """Write the corpus under ``root``; returns what a build of it must produce (for tests)."""
    expected = {"written": 0, "filtered": {}, "failed": {}}
    for c in range(copies):
        suffix = "" if c == 0 else f"_{c:03d}"
        for i, (name, (stem, caption)) in enumerate(sorted(PHOTOS.items())):
            im = skimage_photo(name)
            stem = stem + suffix
            if i % 3 == 0:
                _write(root, f"{stem}.jpg", jpeg_bytes(im))
            elif i % 3 == 1:
                buf = io.BytesIO()
                im.save(buf, "PNG")
                _write(root, f"{stem}.png", buf.getvalue())
            else:
                buf = io.BytesIO()
                im.convert("RGB").save(buf, "WEBP", quality=90)
                _write(root, f"{stem}.webp", buf.getvalue())
            _write(root, f"{stem}.txt", caption + ("\n" if i % 2 else "  "))
            if i % 4 == 0:
                _write(root, f"{stem}.json", json.dumps({"source": "scikit-image", "file": name}))
            expected["written"] += 1
    chelsea = skimage_photo("chelsea.png")
    # a photo stored sideways with an EXIF orientation tag (6 = rotate 90° clockwise to display)
    exif = Image.Exif()
    exif[0x0112] = 6
    _write(root, "odd/rotated_cat.jpg", jpeg_bytes(chelsea.transpose(Image.Transpose.ROTATE_90), exif=exif))
    _write(root, "odd/rotated_cat.txt", "a tabby cat, stored sideways with an EXIF orientation tag")
    # a PNG named .jpg: decoded by content, written
    buf = io.BytesIO()
    skimage_photo("coffee.png").save(buf, "PNG")
    _write(root, "odd/png_named_jpg.jpg", buf.getvalue())
    _write(root, "odd/png_named_jpg.txt", "a cup of coffee saved as PNG but named .jpg")
    # a caption in Windows-1252, not UTF-8: decoded with a recorded warning, written
    _write(root, "odd/latin1_caption.png", _png(skimage_photo("rocket.jpg")))
    _write(root, "odd/latin1_caption.txt", "a rocket – café-style caption".encode("cp1252"))
    # 16-bit grayscale and palette-with-transparency images
    arr16 = (np.asarray(skimage_photo("camera.png"), dtype=np.uint16) * 257).astype(np.uint16)
    _write(root, "odd/gray16.png", _png(Image.fromarray(arr16)))
    _write(root, "odd/gray16.txt", "a 16-bit grayscale photo of a cameraman")
    logo = skimage_photo("logo.png").convert("RGBA").convert("P")
    _write(root, "odd/palette.png", _png(logo))
    _write(root, "odd/palette.txt", "a palette image of a logo")
    expected["written"] += 5
    # broken inputs
    good = jpeg_bytes(skimage_photo("astronaut.png"))
    _write(root, "broken/truncated.jpg", good[: len(good) // 3])
    _write(root, "broken/truncated.txt", "this jpeg was cut short")
    _write(root, "broken/zero_bytes.jpg", b"")
    _write(root, "broken/zero_bytes.txt", "an empty file")
    _write(root, "broken/huge_header.png", huge_header_png())
    _write(root, "broken/huge_header.txt", "a header that claims 65500 x 65500 pixels")
    _write(root, "broken/not_an_image.jpg", b"this is plain text, not a JPEG\n" * 20)
    _write(root, "broken/not_an_image.txt", "text named .jpg")
    _write(root, "broken/binary_caption.jpg", jpeg_bytes(skimage_photo("coins.png")))
    _write(root, "broken/binary_caption.txt", bytes(range(32)) * 8)
    _write(root, "broken/caption_only.txt", "a caption whose image is missing")
    _write(root, "broken/unsupported.xyz", b"\x00\x01")
    _write(root, "broken/bad_metadata.jpg", jpeg_bytes(skimage_photo("horse.png")))
    _write(root, "broken/bad_metadata.txt", "a horse with a broken json sidecar")
    _write(root, "broken/bad_metadata.json", "{not json")
    for rel, reason in BROKEN.items():
        status = "filtered" if reason.split(":")[0] in ("max_pixels", "missing", "unsupported", "min_side") else "failed"
        expected[status][reason] = expected[status].get(reason, 0) + 1
    return expected


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--copies", type=int, default=1, help="replicate the photos N times (distinct keys)")
    args = parser.parse_args()
    expected = make_corpus(args.out, args.copies)
    n_bad = sum(sum(v.values()) for k, v in expected.items() if k != "written")
    print(f"corpus: {args.out} ({expected['written']} good records, {n_bad} broken ones)")


if __name__ == "__main__":
    main()
