"""The embedding step of a unit: open_clip image/text embeddings of the written samples, and
audio embeddings (mel-stats or CLAP, no open_clip model needed).

Rows follow the unit's written samples in order. A sample that lacks a modality gets a zero row
(and is left out of that modality's index), so every file stays aligned with the shard.
"""
from __future__ import annotations

import io
import time
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


# ------------------------------------------------------------------------------------- audio

# What identifies an audio encoder (device, precision and batch size do not).
AUDIO_ENCODER_FACTS = ("name", "model", "dim", "modality", "sample_rate", "max_length_s", "params")


def make_audio_encoder(config: BuildConfig, device: Optional[str] = None):
    """The configured audio encoder (``mel-stats`` or ``clap``), set up; None without one."""
    if config.audio_encoder is None:
        return None
    return audio_encoder_from_facts({"name": config.audio_encoder, "model": config.clap_model},
                                    device=device or config.device, precision=config.precision,
                                    batch_size=config.embed_batch_size)


def audio_encoder_from_facts(facts: dict, device: str = "auto", precision: str = "fp32", batch_size: int = 64):
    """Re-create an audio encoder from the facts a build recorded (``manifest["embeddings"]["audio_encoder"]``)."""
    from mmdata.encoders.audio import ClapEncoder, MelStatsEncoder

    if facts["name"] == "mel-stats":
        params = facts.get("params") or {}
        kwargs = {k: params[k] for k in ("sample_rate", "n_mels", "n_fft", "hop_length", "deltas") if k in params}
        encoder = MelStatsEncoder(batch_size=batch_size, **kwargs)
    elif facts["name"] == "clap":
        encoder = ClapEncoder(facts["model"], device=device, precision=precision, batch_size=batch_size)
    else:
        raise ValueError(f"unknown audio encoder {facts['name']!r}")
    encoder.setup()
    return encoder


def audio_encoder_facts(encoder) -> dict:
    return {k: v for k, v in encoder.info().items() if k in AUDIO_ENCODER_FACTS}


class AudioEmbedder:
    """Embeds written samples' audio in batches as the unit produces them, so a unit never holds
    more than one batch of waveforms; ``rows`` then aligns them with the written samples (a zero
    row for a sample without audio). Batches depend only on the unit's content: deterministic."""

    def __init__(self, encoder, batch_size: int):
        self.encoder, self.batch_size = encoder, batch_size
        self.pending: list = []

    def add(self, sample, timer) -> None:
        if sample.audio is None:
            return
        self.pending.append(sample)
        if len(self.pending) >= self.batch_size:
            self.flush(timer)

    def flush(self, timer) -> None:
        if not self.pending:
            return
        t0 = time.perf_counter()
        rows = self.encoder.encode_audio([s.audio for s in self.pending])
        for s, vec in zip(self.pending, rows):
            s.audio_embedding, s.audio = vec, None
        self.pending = []
        timer.add("embed_audio", t0)

    def rows(self, written: Sequence, timer) -> np.ndarray:
        self.flush(timer)
        out = np.zeros((len(written), self.encoder.dim), dtype=np.float32)
        for i, s in enumerate(written):
            if s.audio_embedding is not None:
                out[i] = s.audio_embedding
                s.audio_embedding = None
        return out
