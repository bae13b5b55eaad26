"""The embedding step of a unit: open_clip image/text embeddings of the written samples.

Rows follow the unit's written samples in order. A sample that lacks a modality gets a zero row
(and is left out of that modality's index), so every file stays aligned with the shard.
"""
from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from mmdata.config import BuildConfig


def make_encoder(config: BuildConfig):
    """The configured open_clip encoder (model loaded in ``setup()``, once per process)."""
    from mmdata.encoders.clip import ClipEncoder

    pretrained = None if config.pretrained in (None, "random") else config.pretrained
    encoder = ClipEncoder(model=config.model, pretrained=pretrained, device=config.device, precision=config.precision,
                          batch_size=config.embed_batch_size, seed=config.model_seed)
    encoder.setup()
    return encoder


def _fill(n: int, present: list[int], rows: np.ndarray, dim: int) -> np.ndarray:
    out = np.zeros((n, dim), dtype=np.float32)
    if present:
        out[present] = rows
    return out


def normalise(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.where(norms > 0, rows / np.maximum(norms, 1e-12), 0.0).astype(np.float32)


def embed_samples(encoder, config: BuildConfig, images: Sequence[Optional[Image.Image]],
                  captions: Sequence[Optional[str]]) -> dict[str, np.ndarray]:
    """{modality: (n, d) float32} for the configured modalities, plus ``fused`` when asked."""
    n, dim = len(images), encoder.embed_dim
    out: dict[str, np.ndarray] = {}
    if "image" in config.embed:
        present = [i for i, im in enumerate(images) if im is not None]
        rows = encoder.encode_images([images[i] for i in present]) if present else np.zeros((0, dim), np.float32)
        out["image"] = _fill(n, present, rows, dim)
    if "text" in config.embed:
        present = [i for i, c in enumerate(captions) if c]
        rows = encoder.encode_texts([captions[i] for i in present]) if present else np.zeros((0, dim), np.float32)
        out["text"] = _fill(n, present, rows, dim)
    if config.fused and len(out) > 1:
        out["fused"] = normalise(sum(out.values()))
    return out


def npy_bytes(rows: np.ndarray, dtype: str) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(rows.astype(dtype)), allow_pickle=False)
    return buf.getvalue()
