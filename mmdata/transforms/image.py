"""Image transform: decode → guard → orient → RGB → resize → encode, with Pillow.

The decompression-bomb guard reads only the header. Large JPEG downscales use the decoder's DCT
scaling (``Image.draft``), the main speed lever. Unchanged images whose format already matches the
output keep their original bytes. With ``jpeg_codec="simplejpeg"``, RGB and grey JPEGs are decoded
and JPEG output encoded by libjpeg-turbo through simplejpeg, whose DCT scaling steps by 1/8 (Pillow's
draft only halves), so fewer pixels reach the resize; other formats and CMYK JPEGs stay with Pillow.
With ``resize_backend="opencv"`` the resize runs in OpenCV (img2dataset's choice: INTER_AREA to
downscale, INTER_LANCZOS4 to upscale) on the decoded RGB pixels of any source format.
"""
from __future__ import annotations

import io
import math
import re
import struct
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmdata.errors import SampleFailed, SampleFiltered, UserError


try:  # HEIC/HEIF photos (optional plugin; mmdata.records accepts .heic/.heif only when it is installed)
    from pillow_heif import register_heif_opener
except ImportError:
    pass
else:
    register_heif_opener()

PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}
_FLIP = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1], 5: lambda a: a.transpose(1, 0, 2),
         6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}  # = _TRANSPOSE
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # as ImageOps.exif_transpose
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


@dataclass(frozen=True)
class ImageOptions:
    size: int = 256
    resize_mode: Literal["no", "keep_ratio", "center_crop", "border"] = "keep_ratio"
    only_if_bigger: bool = False
    fmt: Literal["jpg", "png", "webp"] = "jpg"
    quality: int = 95
    min_side: int = 0
    max_aspect_ratio: Optional[float] = None
    max_pixels: int = 100_000_000
    jpeg_codec: Literal["pillow", "simplejpeg"] = "pillow"
    resize_backend: Literal["pillow", "opencv"] = "pillow"


@dataclass
class ImageResult:
    data: bytes
    ext: str
    orig_width: int
    orig_height: int
    width: int
    height: int
    source_format: str
    reencoded: bool
    image: Optional[Image.Image] = None  # the output image, decoded (for encoders: no second decode)
    pixels: Optional[np.ndarray] = None  # or its RGB pixels (the array path), made a Pillow image on demand

    def pil(self) -> Optional[Image.Image]:
        """The output image as Pillow's (from ``pixels`` when the array path made it)."""
        if self.image is None and self.pixels is not None:
            self.image = Image.fromarray(self.pixels, "RGB")
        return self.image


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION, 1)
    except _DECODE_ERRORS:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white."""
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if im.mode == "F" and top <= 1.0:
            arr = arr * 255.0
        elif top > 255.0:
            arr = arr / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def geometry(width: int, height: int, opts: ImageOptions) -> tuple[float, tuple[int, int], tuple[int, int]]:
    """(scale, resized size, output size) for an image displayed at ``width`` × ``height``.

    The output size differs from the resized one for ``center_crop`` and ``border`` (a square).
    With ``only_if_bigger``, an image already small enough is left as it is.
    """
    if opts.resize_mode == "no":
        return 1.0, (width, height), (width, height)
    side = max(width, height) if opts.resize_mode == "border" else min(width, height)
    scale = opts.size / side
    if opts.only_if_bigger and scale >= 1.0:
        return 1.0, (width, height), (width, height)
    resized = (max(1, round(width * scale)), max(1, round(height * scale)))
    square = opts.resize_mode in ("center_crop", "border")
    return scale, resized, (opts.size, opts.size) if square else resized


def _too_many_pixels(exc: Image.DecompressionBombError, max_pixels: int) -> SampleFiltered:
    """Pillow's own bomb error, told in terms of the configured ``max_pixels`` (not Pillow's limit)."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    claimed = f"{found.group(1)} pixels" if found else "more pixels"
    return SampleFiltered("max_pixels", f"{claimed} > {max_pixels} pixels (max_pixels)")


class ImageTransform:
    """Callable on the raw bytes of one image; raises SampleFailed / SampleFiltered."""

    def __init__(self, opts: ImageOptions):
        self.opts = opts
        self.simplejpeg = _simplejpeg() if opts.jpeg_codec == "simplejpeg" else None
        self.cv2 = _cv2() if opts.resize_backend == "opencv" else None
        # libjpeg-turbo decode → OpenCV resize → libjpeg-turbo encode stay numpy arrays end to end: no
        # Pillow image in between (each conversion copies the pixels); the same bytes as through Pillow
        self.array_path = self.simplejpeg is not None and self.cv2 is not None and opts.fmt == "jpg"

    def __call__(self, data: bytes) -> ImageResult:
        # We enforce our own pixel limit on the header (max_pixels); Pillow's warning would only be
        # noise. Silenced here only, never for the whole process (it would leak into users' scripts).
        # Pillow refuses images over 2 x MAX_IMAGE_PIXELS before our header check runs: inside the
        # transform its limit is at least ours, so a configured max_pixels above Pillow's default is
        # honoured; the process's own limit is restored after.
        saved = Image.MAX_IMAGE_PIXELS
        if saved is not None and saved < self.opts.max_pixels:
            Image.MAX_IMAGE_PIXELS = self.opts.max_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return self._transform(data)
        finally:
            Image.MAX_IMAGE_PIXELS = saved

    def _transform(self, data: bytes) -> ImageResult:
        opts = self.opts
        if not data:
            raise SampleFailed("empty:image", "zero-byte file")
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise _too_many_pixels(exc, opts.max_pixels) from None
        except UnidentifiedImageError:
            raise SampleFailed("decode:image", "not a recognised image format") from None
        except _DECODE_ERRORS as exc:
            raise SampleFailed("decode:image", str(exc)) from None
        source_format = im.format or "unknown"
        stored_w, stored_h = im.size
        if stored_w * stored_h > opts.max_pixels:
            raise SampleFiltered("max_pixels", f"{stored_w}x{stored_h} = {stored_w * stored_h} pixels "
                                               f"> {opts.max_pixels} pixels (max_pixels)")
        orientation = _orientation(im)
        width, height = (stored_h, stored_w) if orientation in _SWAPS_AXES else (stored_w, stored_h)
        if min(width, height) < max(opts.min_side, 1):
            raise SampleFiltered("min_side", f"{width}x{height} < {opts.min_side}")
        if opts.max_aspect_ratio and max(width, height) / min(width, height) > opts.max_aspect_ratio:
            raise SampleFiltered("max_aspect_ratio", f"{width}x{height}")
        scale, (new_w, new_h), out_size = geometry(width, height, opts)
        unchanged = (
            (new_w, new_h) == (width, height)
            and out_size == (width, height)
            and orientation == 1
            and im.mode == "RGB"
            and "transparency" not in im.info
            and PIL_FORMAT[opts.fmt] == source_format
            and getattr(im, "n_frames", 1) == 1
        )
        try:
            if unchanged:
                im.load()  # a truncated file must still fail, even when we keep its bytes
                return ImageResult(data, opts.fmt, width, height, width, height, source_format, False, im)
            if self.simplejpeg is not None and source_format == "JPEG" and im.mode in ("RGB", "L"):
                least = (math.ceil(stored_w * scale), math.ceil(stored_h * scale)) if scale < 1.0 else (0, 0)
                pixels = self.simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=least[0], min_height=least[1])
                if self.array_path:
                    return self._finish_array(pixels, orientation, (new_w, new_h), out_size, width, height)
                im = Image.fromarray(pixels, "RGB")
            elif source_format == "JPEG" and scale < 1.0:
                im.draft(im.mode, (math.ceil(stored_w * scale), math.ceil(stored_h * scale)))
            im.load()
            if orientation != 1:  # the orientation is known: no second EXIF parse (exif_transpose's)
                im = im.transpose(_TRANSPOSE[orientation])
            im = to_rgb(im)
        except Image.DecompressionBombError as exc:
            raise _too_many_pixels(exc, opts.max_pixels) from None
        except _DECODE_ERRORS as exc:
            raise SampleFailed("decode:image", str(exc)) from None
        if im.size != (new_w, new_h):
            im = self._resize(im, (new_w, new_h))
        if out_size != im.size and opts.resize_mode == "center_crop":
            left, top = (new_w - out_size[0]) // 2, (new_h - out_size[1]) // 2
            im = im.crop((left, top, left + out_size[0], top + out_size[1]))
        elif out_size != im.size:  # border: pad to the square, centred, black
            canvas = Image.new("RGB", out_size, (0, 0, 0))
            canvas.paste(im, ((out_size[0] - new_w) // 2, (out_size[1] - new_h) // 2))
            im = canvas
        return ImageResult(encode(im, opts), opts.fmt, width, height, im.width, im.height, source_format, True, im)


    def _finish_array(self, pixels: np.ndarray, orientation: int, size: tuple[int, int], out_size: tuple[int, int],
                      width: int, height: int) -> ImageResult:
        """The rest of ``_transform`` on decoded RGB pixels: orient, resize (OpenCV), crop or pad, encode
        (libjpeg-turbo), as the Pillow route does it, pixel for pixel."""
        opts = self.opts
        if orientation != 1:
            pixels = _FLIP[orientation](pixels)
        if pixels.shape[1::-1] != size:
            grows = size[0] > pixels.shape[1] or size[1] > pixels.shape[0]
            pixels = self.cv2.resize(np.ascontiguousarray(pixels), size,
                                     interpolation=self.cv2.INTER_LANCZOS4 if grows else self.cv2.INTER_AREA)
        if out_size != size and opts.resize_mode == "center_crop":
            left, top = (size[0] - out_size[0]) // 2, (size[1] - out_size[1]) // 2
            pixels = pixels[top: top + out_size[1], left: left + out_size[0]]
        elif out_size != size:  # border: pad to the square, centred, black
            canvas = np.zeros((out_size[1], out_size[0], 3), dtype=np.uint8)
            left, top = (out_size[0] - size[0]) // 2, (out_size[1] - size[1]) // 2
            canvas[top: top + size[1], left: left + size[0]] = pixels
            pixels = canvas
        pixels = np.ascontiguousarray(pixels)
        data = self.simplejpeg.encode_jpeg(pixels, quality=opts.quality, colorspace="RGB", colorsubsampling="420")
        return ImageResult(data, opts.fmt, width, height, pixels.shape[1], pixels.shape[0], "JPEG", True, pixels=pixels)

    def _resize(self, im: Image.Image, size: tuple[int, int]) -> Image.Image:
        """Pillow's Lanczos (after an integer ``reduce`` when the image is 3× the target or more), or
        OpenCV: INTER_AREA when no side grows, INTER_LANCZOS4 when one does (``im`` is RGB here)."""
        if self.cv2 is None:
            return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        cv2 = self.cv2
        grows = size[0] > im.width or size[1] > im.height
        arr = cv2.resize(np.asarray(im), size, interpolation=cv2.INTER_LANCZOS4 if grows else cv2.INTER_AREA)
        return Image.fromarray(arr, "RGB")


def _cv2():
    try:
        import cv2
    except ImportError:
        raise UserError("resize_backend opencv needs the package opencv-python-headless (pip install 'mmdata[fast]')") from None
    cv2.setNumThreads(1)  # one thread per worker process: the workers are the parallelism
    return cv2


def _simplejpeg():
    try:
        import simplejpeg
    except ImportError:
        raise UserError("jpeg_codec simplejpeg needs the package simplejpeg (pip install 'mmdata[fast]')") from None
    return simplejpeg


def encode(im: Image.Image, opts: ImageOptions) -> bytes:
    if opts.fmt == "jpg" and opts.jpeg_codec == "simplejpeg" and im.mode == "RGB":
        return _simplejpeg().encode_jpeg(np.asarray(im), quality=opts.quality, colorspace="RGB", colorsubsampling="420")
    buf = io.BytesIO()
    if opts.fmt == "jpg":
        im.save(buf, "JPEG", quality=opts.quality)
    elif opts.fmt == "png":
        im.save(buf, "PNG", compress_level=6)
    else:
        im.save(buf, "WEBP", quality=opts.quality, method=4)
    return buf.getvalue()
