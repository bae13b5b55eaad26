"""The augmentation stage: one object for offline views (in the unit of work) and online
augmentation (in the training loader), with the same ops and the same draws either way.

Offline: view ``v`` (1 … ``views``) of sample ``key`` is ``aug.image(im, key, v)`` (and
``.audio`` / ``.mel`` / ``.text``), written as the sample :func:`view_key` ``(key, v)`` with
``parent_key`` and the ``applied`` records in its json. Online: :meth:`Augmenter.image` is the
loader's ``augment`` hook as it is — ``make_loader(out, augment=aug.image, seed=s)`` calls it with
``(image, key, 0, mix_seed(s, epoch))``, so each epoch draws anew and a rerun draws the same;
a loader that augments other modalities calls ``aug.audio(wav, sr, key, 0, mix_seed(s, epoch))``
(``mmdata.loader.mix_seed``) the same way.
Either way the draws come only from ``hash(seed, key, view)`` (:mod:`mmdata.augment.seeding`).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
from PIL import Image

from mmdata.augment.config import AugmentConfig, load_augment_config
from mmdata.augment.seeding import op_rng
from mmdata.keys import sanitize_key

Applied = list[dict]


def view_key(key: str, view: int) -> str:
    """The key of offline view ``view`` of sample ``key``: ``<key>_v01`` … (tar-safe, ≤ 128 chars:
    an over-long key is shortened with a hash of the full name, like every key)."""
    return sanitize_key(f"{key}_v{view:02d}")


class Augmenter:
    """Seeded augmentation of one sample's image, audio, log-mel and caption.

    Every method returns ``(output, applied)``: ``applied`` lists the ops that fired, in order,
    each ``{"op": name, **drawn parameters}`` (JSON-serialisable). ``seed=None`` uses the config's.
    """

    name = "augment"

    def __init__(self, config: Union[AugmentConfig, Mapping, str, os.PathLike, None] = None):
        self.config = load_augment_config(config)

    def _run(self, modality: str, x: Any, key: str, view: int, seed: Optional[int], *ctx: Any) -> tuple[Any, Applied]:
        seed = self.config.seed if seed is None else seed
        applied: Applied = []
        for index, op in enumerate(getattr(self.config, modality)):
            rng = op_rng(seed, key, view, modality, index)
            if rng.random() >= op.p:  # drawn even when p is 0 or 1: the stream is the same whatever p
                continue
            params = op.draw(rng, x, *ctx)
            x = op.apply(x, params, *ctx)
            applied.append({"op": op.op, **params})
        return x, applied

    def image(self, image: Image.Image, key: str, view: int = 0, seed: Optional[int] = None) -> tuple[Image.Image, Applied]:
        """Augment a Pillow image (any mode; made RGB first, transparency on white). Returns RGB."""
        from mmdata.transforms.image import to_rgb

        return self._run("image", to_rgb(image), key, view, seed)

    def audio(self, samples: np.ndarray, sr: int, key: str, view: int = 0,
              seed: Optional[int] = None) -> tuple[np.ndarray, Applied]:
        """Augment float32 samples ``[frames]`` or ``[frames, channels]`` at rate ``sr`` (unchanged)."""
        return self._run("audio", np.ascontiguousarray(samples, dtype=np.float32), key, view, seed, int(sr))

    def mel(self, mel: np.ndarray, key: str, view: int = 0, seed: Optional[int] = None) -> tuple[np.ndarray, Applied]:
        """Mask a log-mel spectrogram ``[n_mels, frames]`` (dtype kept)."""
        return self._run("mel", np.asarray(mel), key, view, seed)

    def text(self, text: Union[str, Sequence[str]], key: str, view: int = 0,
             seed: Optional[int] = None) -> tuple[str, Applied]:
        """Augment a caption, or choose among a sample's captions (``choose_caption``); without that
        op the first caption is used. No caption gives ``""`` and no ops."""
        captions = [text] if isinstance(text, str) else [str(t) for t in text]
        if not captions:
            return "", []
        out, applied = self._run("text", captions, key, view, seed)
        return out[0], applied

    def __call__(self, sample: Mapping[str, Any], key: str, view: int = 0, seed: Optional[int] = None) -> dict:
        """Augment every modality present in ``sample`` (``image``, ``audio`` with ``sample_rate``,
        ``mel``, ``text``); returns a new dict with them replaced and ``augment: {modality: applied}``."""
        out, applied = dict(sample), {}
        if sample.get("image") is not None:
            out["image"], applied["image"] = self.image(sample["image"], key, view, seed)
        if sample.get("audio") is not None:
            out["audio"], applied["audio"] = self.audio(sample["audio"], sample["sample_rate"], key, view, seed)
        if sample.get("mel") is not None:
            out["mel"], applied["mel"] = self.mel(sample["mel"], key, view, seed)
        if sample.get("text") is not None:
            out["text"], applied["text"] = self.text(sample["text"], key, view, seed)
        out["augment"] = applied
        return out

    def replay(self, modality: str, x: Any, applied: Applied, sr: Optional[int] = None) -> Any:
        """Re-apply recorded ops to ``x`` (for audit and debugging): the same input and records give
        the same output, bytes included. Records are matched to this config's ops in order."""
        ops = list(getattr(self.config, modality))
        ctx = (int(sr),) if modality == "audio" else ()
        if modality == "image":
            from mmdata.transforms.image import to_rgb

            x = to_rgb(x)
        elif modality == "audio":
            x = np.ascontiguousarray(x, dtype=np.float32)
        elif modality == "text":
            x = [x] if isinstance(x, str) else list(x)
        for record in applied:
            while ops and ops[0].op != record["op"]:
                ops.pop(0)
            if not ops:
                raise ValueError(f"record {record} matches no remaining {modality} op of this config")
            params = {k: v for k, v in record.items() if k != "op"}
            x = ops.pop(0).apply(x, params, *ctx)
        return x[0] if modality == "text" else x
