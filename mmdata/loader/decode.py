"""One raw sample (the tar members, plus where it lives) → decoded fields, in a loader worker.

Images: Pillow → RGB → the ``augment`` hook → ``transform`` (the build model's eval preprocessing
by default). Text: the caption, and token ids (stored ``tokens.npy``, else the tokenizer). Audio:
the waveform (flac/wav/…) or stored log-mel (``mel.npy``), cropped or zero-padded to a fixed
length with a mask. Stored embeddings are joined by (shard, row). Randomness (augmentation,
random crops) comes from ``(seed, key, epoch)`` only.
"""
from __future__ import annotations

import contextlib
import io
import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmdata.errors import SampleError
from mmdata.loader.plan import mix_seed

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTS = ("flac", "wav", "mp3", "ogg", "opus")
MODALITIES = ("image", "text", "audio", "mel")

Crop = Literal["start", "center", "random"]
# augment(image, key, view, seed) -> image | (image, applied): an image hook, such as
# mmdata.augment's Augmenter.image; or an Augmenter itself, for every modality it has ops for.
Augment = Callable[[Image.Image, str, int, int], Any]


def augment_hooks(augment: Any) -> dict[str, Callable]:
    """modality → hook. An object with ``image``/``audio``/``mel``/``text`` methods (an Augmenter)
    gives a hook per modality its config has ops for; a plain callable is the image hook."""
    if augment is None:
        return {}
    if callable(getattr(augment, "image", None)):
        config = getattr(augment, "config", None)
        return {m: getattr(augment, m) for m in MODALITIES
                if callable(getattr(augment, m, None)) and (config is None or getattr(config, m, ()))}
    if not callable(augment):
        raise TypeError(f"augment must be callable or an Augmenter, got {type(augment).__name__}")
    return {"image": augment}


def _split(result: Any) -> tuple[Any, Any]:
    return result if isinstance(result, tuple) else (result, None)


class LoaderDecodeError(Exception):
    """A stored member could not be decoded (a damaged shard: ``mmdata verify`` finds these)."""


@dataclass
class DecodeSpec:
    modalities: Sequence[str] = ("image", "text")
    transform: Optional[Callable] = None
    tokenizer: Optional[Callable] = None
    augment: Optional[Augment] = None
    audio_seconds: float = 10.0
    sample_rate: Optional[int] = None
    mel_frames: int = 1000
    crop: Crop = "start"
    seed: int = 0
    embeddings: Sequence[str] = field(default_factory=tuple)


def _crop_start(n: int, length: int, crop: Crop, rng_seed: int) -> int:
    if n <= length or crop == "start":
        return 0
    if crop == "center":
        return (n - length) // 2
    return random.Random(rng_seed).randrange(n - length + 1)


def fit_length(x: np.ndarray, length: int, crop: Crop, rng_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop or zero-pad the last axis of ``x`` to ``length``; returns (array, bool mask of real steps)."""
    n = x.shape[-1]
    start = _crop_start(n, length, crop, rng_seed)
    x = x[..., start:start + length]
    mask = np.zeros(length, dtype=bool)
    mask[:x.shape[-1]] = True
    if x.shape[-1] < length:
        pad = [(0, 0)] * (x.ndim - 1) + [(0, length - x.shape[-1])]
        x = np.pad(x, pad)
    return np.ascontiguousarray(x, dtype=np.float32), mask


@contextlib.contextmanager
def _decoding(raw: dict, member: str) -> Iterator[None]:
    """Turn a failure to decode a stored member into one error naming the sample and the shard."""
    try:
        yield
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, SampleError) as exc:
        raise LoaderDecodeError(f"{raw['__key__']}.{member} in shards/{raw['__shard__']}.tar: {exc}") from exc


def _first(sample: dict, exts: Sequence[str]) -> Optional[str]:
    return next((e for e in exts if e in sample), None)


class SampleDecoder:
    """``decoder(raw, epoch)`` → dict of decoded fields for ``collate``."""

    def __init__(self, spec: DecodeSpec, stores: dict):
        self.spec = spec
        self.stores = stores  # modality → EmbeddingStore
        self.hooks = augment_hooks(spec.augment)

    def __call__(self, raw: dict, epoch: int) -> dict:
        key = raw["__key__"]
        spec = self.spec
        out: dict[str, Any] = {"__key__": key, "id": raw["__id__"], "repeat": raw.get("__repeat__", False),
                               "shard": raw["__shard__"], "row": raw["__row__"]}
        applied: dict[str, Any] = {}
        aug_seed = mix_seed(spec.seed, epoch)  # the hooks mix in the key and the view
        with _decoding(raw, "json"):
            out["json"] = json.loads(raw["json"]) if "json" in raw else {}
        if "image" in spec.modalities:
            self._image(raw, out, key, aug_seed, applied)
        if "text" in spec.modalities:
            self._text(raw, out, key, aug_seed, applied)
        if "audio" in spec.modalities:
            self._audio(raw, out, key, epoch, aug_seed, applied)
        if "mel" in spec.modalities and "mel.npy" in raw:
            with _decoding(raw, "mel.npy"):
                mel = np.load(io.BytesIO(raw["mel.npy"]))
            if "mel" in self.hooks:
                mel, applied["mel"] = _split(self.hooks["mel"](mel, key, 0, aug_seed))
            out["mel"], out["mel_mask"] = fit_length(mel, spec.mel_frames, spec.crop, mix_seed(spec.seed, key, epoch, "mel"))
        if self.hooks:
            out["augment"] = applied
        if spec.embeddings:
            out["embeddings"] = {m: self.stores[m].rows(raw["__shard__"], raw["__row__"]) for m in spec.embeddings}
        return out

    def _image(self, raw: dict, out: dict, key: str, aug_seed: int, applied: dict) -> None:
        ext = _first(raw, IMAGE_EXTS)
        if ext is None:
            return
        with _decoding(raw, ext):
            im = Image.open(io.BytesIO(raw[ext])).convert("RGB")
        if "image" in self.hooks:
            im, applied["image"] = _split(self.hooks["image"](im, key, 0, aug_seed))
        out["image"] = self.spec.transform(im) if self.spec.transform is not None else im

    def _text(self, raw: dict, out: dict, key: str, aug_seed: int, applied: dict) -> None:
        if "txt" not in raw:
            return
        with _decoding(raw, "txt"):
            out["text"] = raw["txt"].decode("utf-8")
        changed = False
        if "text" in self.hooks:
            text, applied["text"] = _split(self.hooks["text"](out["text"], key, 0, aug_seed))
            changed, out["text"] = text != out["text"], text
        if "tokens.npy" in raw and not changed:
            with _decoding(raw, "tokens.npy"):
                out["tokens"] = torch.from_numpy(np.load(io.BytesIO(raw["tokens.npy"])).astype(np.int64))
        elif self.spec.tokenizer is not None:  # no stored tokens, or an augmented caption
            out["tokens"] = self.spec.tokenizer([out["text"]])[0].long()

    def _audio(self, raw: dict, out: dict, key: str, epoch: int, aug_seed: int, applied: dict) -> None:
        ext = _first(raw, AUDIO_EXTS)
        if ext is None:
            return
        from mmdata.transforms.audio import decode_audio, downmix, resample

        with _decoding(raw, ext):
            samples, sr, _ = decode_audio(raw[ext], ext)
        if "audio" in self.hooks:
            samples, applied["audio"] = _split(self.hooks["audio"](samples, sr, key, 0, aug_seed))
        wav = downmix(samples)
        if self.spec.sample_rate and sr != self.spec.sample_rate:
            wav, sr = resample(wav, sr, self.spec.sample_rate), self.spec.sample_rate
        length = round(self.spec.audio_seconds * sr)
        out["audio"], out["audio_mask"] = fit_length(np.asarray(wav, dtype=np.float32).reshape(-1), length,
                                                     self.spec.crop, mix_seed(self.spec.seed, key, epoch, "audio"))
        out["sample_rate"] = sr
