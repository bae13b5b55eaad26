"""The embedding step of a unit: open_clip image/text embeddings of the written samples, and
audio embeddings (mel-stats or CLAP, no open_clip model needed).

Rows follow the unit's written samples in order. A sample that lacks a modality gets a zero row
(and is left out of that modality's index), so every file stays aligned with the shard.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from mmdata.config import BuildConfig


def _fill(n: int, present: list[int], rows: np.ndarray, dim: int) -> np.ndarray:
    out = np.zeros((n, dim), dtype=np.float32)
    if present:
        out[present] = rows
    return out


def normalise(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.where(norms > 0, rows / np.maximum(norms, 1e-12), 0.0).astype(np.float32)


def embed_samples(encoder, config: BuildConfig, images: Sequence[Optional[Image.Image]],
                  captions: Sequence[Optional[str]], image_rows: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """{modality: (n, d) float32} for the configured modalities, plus ``fused`` when asked.
    ``image_rows``: the image rows already computed (:class:`ImageEmbedder`); ``images`` is then unused."""
    n, dim = len(captions), encoder.embed_dim
    out: dict[str, np.ndarray] = {}
    if "image" in config.embed and image_rows is not None:
        out["image"] = image_rows
    elif "image" in config.embed:
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


class ImageEmbedder:
    """Embeds the unit's images batch by batch in one background thread while the unit goes on
    decoding and resizing the next records, so the model does not wait for the data path (Pillow
    and torch both release the GIL). At most ``MAX_IN_FLIGHT`` batches wait for the model, which
    bounds the images held. Batches are formed in processing order, which depends only on the
    unit's content: the rows are the same on every run, engine and worker count."""

    MAX_IN_FLIGHT = 2

    def __init__(self, encoder, batch_size: int):
        self.encoder, self.batch_size = encoder, batch_size
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmdata-embed")
        self.pending: list = []
        self.in_flight: deque = deque()  # (samples, future)
        self.rows_of: dict[int, np.ndarray] = {}
        self.wait_seconds = 0.0

    def add(self, sample) -> None:
        """Queue a written sample's image (and drop the unit's reference to it)."""
        if sample.image is None:
            return
        self.pending.append(sample)
        if len(self.pending) >= self.batch_size:
            self._submit()

    def _submit(self) -> None:
        batch, self.pending = self.pending, []
        images = [s.image for s in batch]
        for s in batch:
            s.image = None
        self.in_flight.append((batch, self.pool.submit(self.encoder.encode_images, images)))
        while len(self.in_flight) > self.MAX_IN_FLIGHT:
            self._collect()

    def _collect(self) -> None:
        batch, future = self.in_flight.popleft()
        start = time.perf_counter()
        rows = future.result()  # an encoder error surfaces here, in the unit
        self.wait_seconds += time.perf_counter() - start
        for s, row in zip(batch, rows):
            self.rows_of[id(s)] = row

    def rows(self, written: Sequence, timer) -> np.ndarray:
        """(len(written), d) rows aligned with ``written``; zero rows for samples not embedded."""
        if self.pending:
            self._submit()
        while self.in_flight:
            self._collect()
        timer.seconds["embed_wait"] += self.wait_seconds
        out = np.zeros((len(written), self.encoder.embed_dim), dtype=np.float32)
        for i, s in enumerate(written):
            row = self.rows_of.get(id(s))
            if row is not None:
                out[i] = row
        return out

    def close(self) -> None:
        for _, future in self.in_flight:
            future.cancel()
        self.pool.shutdown(wait=True)


# ------------------------------------------------------------------------------------- audio

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
