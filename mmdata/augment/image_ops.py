"""Image ops on Pillow RGB images: crop, flip, rotation, colour jitter, grayscale, blur, JPEG.

The pixel work is Pillow's (``resize(box=)``, ``transpose``, ``rotate``, ``ImageEnhance``,
``GaussianBlur``, the JPEG codec); parameters follow torchvision's conventions (the ones open_clip's
training transforms use), but are drawn from the op's own seeded generator, never a global one.
"""
from __future__ import annotations

import io
import math
from typing import Annotated, Literal, Optional, Union

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter
from pydantic import BeforeValidator, Field, model_validator

from mmdata.augment.base import FloatRange, IntRange, Op, uniform

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos"]
_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
Channel = Annotated[int, Field(ge=0, le=255)]


class ImageOp(Op):
    modality = "image"


class RandomResizedCrop(ImageOp):
    """Crop a random area fraction (``scale``) and aspect ratio (``ratio``), resize to ``size``
    (``[w, h]``, an int for a square, or null: the input's size). torchvision's sampling: 10 tries,
    then a centre crop."""

    op: Literal["random_resized_crop"]
    scale: FloatRange = (0.08, 1.0)
    ratio: FloatRange = (3 / 4, 4 / 3)
    size: Optional[Union[Annotated[int, Field(ge=1)], tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]]] = None
    interpolation: Interpolation = "bicubic"

    @model_validator(mode="after")
    def _check(self) -> "RandomResizedCrop":
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError("scale must be [low, high] with 0 < low <= high <= 1")
        if self.ratio[0] <= 0:
            raise ValueError("ratio must be > 0")
        return self

    def draw(self, rng: np.random.Generator, im: Image.Image) -> dict:
        W, H = im.size
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = W * H * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= W and 0 < h <= H:
                left, top = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
                break
        else:  # centre crop at the nearest allowed aspect ratio
            w, h = W, H
            if W / H < self.ratio[0]:
                h = round(W / self.ratio[0])
            elif W / H > self.ratio[1]:
                w = round(H * self.ratio[1])
            w, h = min(max(w, 1), W), min(max(h, 1), H)
            left, top = (W - w) // 2, (H - h) // 2
        size = self.size if self.size is not None else (W, H)
        size = (size, size) if isinstance(size, int) else size
        return {"box": [left, top, left + w, top + h], "size": [int(size[0]), int(size[1])]}

    def apply(self, im: Image.Image, params: dict) -> Image.Image:
        return im.resize(tuple(params["size"]), _RESAMPLE[self.interpolation], box=tuple(params["box"]))


class HorizontalFlip(ImageOp):
    """Mirror left-right."""

    op: Literal["horizontal_flip"]

    def apply(self, im: Image.Image, params: dict) -> Image.Image:
        return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def _symmetric(value):
    return (-abs(value), abs(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class Rotation(ImageOp):
    """Rotate by an angle drawn from ``degrees`` (``d`` means ``[-d, d]``), counter-clockwise; corners
    get ``fill``; ``expand`` grows the canvas to hold the whole image (the size then changes)."""

    op: Literal["rotation"]
    degrees: Annotated[FloatRange, BeforeValidator(_symmetric)] = (-15.0, 15.0)
    expand: bool = False
    fill: tuple[Channel, Channel, Channel] = (0, 0, 0)
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"

    def draw(self, rng: np.random.Generator, im: Image.Image) -> dict:
        return {"angle": uniform(rng, *self.degrees, digits=3)}

    def apply(self, im: Image.Image, params: dict) -> Image.Image:
        return im.rotate(params["angle"], _RESAMPLE[self.interpolation], expand=self.expand, fillcolor=tuple(self.fill))


def _factor_range(value):
    """torchvision's convention: a number ``b`` means factors in ``[max(0, 1 - b), 1 + b]``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("must be >= 0")
        return None if value == 0 else (max(0.0, 1.0 - value), 1.0 + value)
    return value


def _hue_range(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 <= value <= 0.5:
            raise ValueError("must be in [0, 0.5]")
        return None if value == 0 else (-value, value)
    return value


FactorRange = Annotated[Optional[FloatRange], BeforeValidator(_factor_range)]


class ColorJitter(ImageOp):
    """Brightness, contrast, saturation (factors; ``b`` means ``[1-b, 1+b]``) and hue (a shift in
    turns; ``h`` means ``[-h, h]``, at most 0.5), applied in that order, each only if configured."""

    op: Literal["color_jitter"]
    brightness: FactorRange = None
    contrast: FactorRange = None
    saturation: FactorRange = None
    hue: Annotated[Optional[FloatRange], BeforeValidator(_hue_range)] = None

    @model_validator(mode="after")
    def _check(self) -> "ColorJitter":
        for name in ("brightness", "contrast", "saturation"):
            rng = getattr(self, name)
            if rng is not None and rng[0] < 0:
                raise ValueError(f"{name} factors must be >= 0")
        if self.hue is not None and not -0.5 <= self.hue[0] <= self.hue[1] <= 0.5:
            raise ValueError("hue must lie in [-0.5, 0.5]")
        if all(getattr(self, n) is None for n in ("brightness", "contrast", "saturation", "hue")):
            raise ValueError("set at least one of brightness, contrast, saturation, hue")
        return self

    def draw(self, rng: np.random.Generator, im: Image.Image) -> dict:
        return {name: uniform(rng, *getattr(self, name))
                for name in ("brightness", "contrast", "saturation", "hue") if getattr(self, name) is not None}

    def apply(self, im: Image.Image, params: dict) -> Image.Image:
        if "brightness" in params:
            im = ImageEnhance.Brightness(im).enhance(params["brightness"])
        if "contrast" in params:
            im = ImageEnhance.Contrast(im).enhance(params["contrast"])
        if "saturation" in params:
            im = ImageEnhance.Color(im).enhance(params["saturation"])
        if params.get("hue"):  # torchvision's Pillow path: shift H in HSV, wrapping at 256
            h, s, v = im.convert("HSV").split()
            shifted = (np.asarray(h, dtype=np.int16) + int(params["hue"] * 255)) % 256
            im = Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8), "L"), s, v)).convert("RGB")
        return im


class Grayscale(ImageOp):
    """Luma (ITU-R 601-2), kept as three equal RGB channels."""

    op: Literal["grayscale"]

    def apply(self, im: Image.Image, params: dict) -> Image.Image:
        return im.convert("L").convert("RGB")


class GaussianBlur(ImageOp):
    """Gaussian blur with a standard deviation (pixels) drawn from ``sigma``."""

    op: Literal["gaussian_blur"]
    sigma: FloatRange = (0.1, 2.0)

    @model_validator(mode="after")
    def _check(self) -> "GaussianBlur":
        if self.sigma[0] < 0:
            raise ValueError("sigma must be >= 0")
        return self

    def draw(self, rng: np.random.Generator, im: Image.Image) -> dict:
        return {"sigma": uniform(rng, *self.sigma, digits=3)}

    def apply(self, im: Image.Image, params: dict) -> Image.Image:
        return im.filter(ImageFilter.GaussianBlur(params["sigma"]))


class Jpeg(ImageOp):
    """Re-compress as JPEG at a quality drawn from ``quality`` (inclusive) and decode again."""

    op: Literal["jpeg"]
    quality: IntRange = (30, 90)

    @model_validator(mode="after")
    def _check(self) -> "Jpeg":
        if not 1 <= self.quality[0] <= self.quality[1] <= 100:
            raise ValueError("quality must be [low, high] within 1..100")
        return self

    def draw(self, rng: np.random.Generator, im: Image.Image) -> dict:
        return {"quality": int(rng.integers(self.quality[0], self.quality[1] + 1))}

    def apply(self, im: Image.Image, params: dict) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=params["quality"])
        out = Image.open(io.BytesIO(buf.getvalue()))
        out.load()
        return out.convert("RGB")


IMAGE_OPS: dict[str, type[ImageOp]] = {
    cls.model_fields["op"].annotation.__args__[0]: cls
    for cls in (RandomResizedCrop, HorizontalFlip, Rotation, ColorJitter, Grayscale, GaussianBlur, Jpeg)
}
