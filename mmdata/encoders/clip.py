"""The open_clip encoder stage: images and captions → L2-normalised float32 embeddings.

The model is loaded once per process (``setup``; see ``loading``). Batches are pipelined: while
the model runs batch *i*, a small thread pool applies the model's own eval transform (or
tokenizer) to the next batches, so the accelerator does not wait on Pillow. On CUDA OOM a batch
is split in halves until it fits (``device.run_with_oom_backoff``).

Determinism: with the same weights and inputs the embeddings are bit-identical across runs and
processes on CPU. They can differ in the last bits with the torch thread count, the encoder batch
size (an OOM back-off changes it) or the device, as float reductions are blocked differently.
"""
from __future__ import annotations

import itertools
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmdata.encoders.device import autocast, effective_precision, resolve_device, run_with_oom_backoff
from mmdata.encoders.loading import LoadedModel, load_model
from mmdata.errors import UserError

T = TypeVar("T")


def _batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def pipelined(batches: Iterable[T], prepare: Callable[[T], Any], run: Callable[[Any], Any], threads: int) -> list:
    """``[run(prepare(b)) for b in batches]``, with up to ``threads`` batches prepared ahead in threads.

    ``run`` stays on the calling thread, in input order; ``threads=0`` prepares inline.
    """
    if threads <= 0:
        return [run(prepare(b)) for b in batches]
    results = []
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mmdata-prep") as pool:
        try:
            for batch in batches:
                pending.append(pool.submit(prepare, batch))
                if len(pending) > threads:  # bounded look-ahead: at most `threads` batches waiting
                    results.append(run(pending.popleft().result()))
            while pending:
                results.append(run(pending.popleft().result()))
        finally:
            for fut in pending:
                fut.cancel()
    return results


class ClipEncoder:
    """An open_clip model as a stage: ``encode_images`` / ``encode_texts`` → (n, d) float32 rows.

    ``pretrained``: an open_clip tag, a local checkpoint path, or ``None``/``"random"`` for random
    weights drawn from ``seed`` (tests). ``precision``: fp16/bf16 autocast on CUDA; on CPU bf16
    autocast, fp16 falls back to fp32. ``device="auto"`` picks CUDA when present.
    """

    name = "clip"

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: Optional[str] = "laion2b_s34b_b79k",
        device: str = "auto",
        precision: str = "fp32",
        batch_size: int = 64,
        seed: int = 0,
        prefetch_threads: int = 2,
    ):
        if batch_size < 1:
            raise UserError(f"encoder batch size must be >= 1, got {batch_size}")
        if prefetch_threads < 0:
            raise UserError(f"prefetch_threads must be >= 0, got {prefetch_threads}")
        self.model = model
        self.pretrained = pretrained
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.seed = seed
        self.prefetch_threads = prefetch_threads
        self._loaded: Optional[LoadedModel] = None
        self._device: Optional[str] = None
        self._precision: Optional[str] = None
        self._forward_batch_size = batch_size  # shrinks after a CUDA OOM

    # -- stage contract -------------------------------------------------------------------------

    def setup(self) -> None:
        """Resolve the device and load the model (once per process: shared through a module cache)."""
        if self._loaded is not None:
            return
        self._device = resolve_device(self.device)
        self._precision = effective_precision(self.precision, self._device)
        self._loaded = load_model(self.model, self.pretrained, self._device, self._precision, self.seed)

    def __call__(self, items: Sequence[Union[Image.Image, str]]) -> np.ndarray:
        """Embed a batch of PIL images or of strings (not mixed)."""
        if items and all(isinstance(x, str) for x in items):
            return self.encode_texts(items)
        if all(isinstance(x, Image.Image) for x in items):
            return self.encode_images(items)
        raise TypeError("ClipEncoder takes a sequence of PIL images or a sequence of strings")

    def info(self) -> dict[str, Any]:
        """What produced the embeddings (for manifest.json): model, weights, sha256, dim, device, versions."""
        self.setup()
        return {**self._loaded.info, "requested_precision": self.precision, "batch_size": self.batch_size}

    @property
    def embed_dim(self) -> int:
        self.setup()
        return self._loaded.embed_dim

    def __getstate__(self) -> dict:
        # Ship the configuration, never the model: each worker process loads its own in setup().
        state = dict(self.__dict__)
        state.update(_loaded=None, _device=None, _precision=None, _forward_batch_size=self.batch_size)
        return state

    # -- encoding -------------------------------------------------------------------------------

    def encode_images(self, images: Iterable[Image.Image]) -> np.ndarray:
        """(n, d) float32 L2-normalised rows, in input order; preprocessing overlaps the forward."""
        self.setup()
        transform = self._loaded.preprocess

        def prepare(batch: list[Image.Image]) -> torch.Tensor:
            x = torch.stack([transform(im if im.mode == "RGB" else im.convert("RGB")) for im in batch])
            return x.pin_memory() if self._on_cuda else x

        return self._run(_batched(images, self.batch_size), prepare, self._loaded.model.encode_image)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) float32 L2-normalised rows, in input order, with the model's own tokenizer."""
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a sequence of strings, not one string")
        self.setup()
        tokenizer = self._loaded.tokenizer

        def prepare(batch: list[str]) -> torch.Tensor:
            tokens = tokenizer(list(batch))
            return tokens.pin_memory() if self._on_cuda else tokens

        return self._run(_batched(texts, self.batch_size), prepare, self._loaded.model.encode_text)

    def encode_image_tensors(self, tensor: torch.Tensor) -> np.ndarray:
        """Embed already-preprocessed images (N, 3, H, W): the forward alone, for benchmarks."""
        self.setup()
        batches = (tensor[i : i + self.batch_size] for i in range(0, len(tensor), self.batch_size))
        return self._run(batches, lambda x: x, self._loaded.model.encode_image, threads=0)

    # -- internals ------------------------------------------------------------------------------

    @property
    def _on_cuda(self) -> bool:
        return torch.device(self._device).type == "cuda"

    def _run(self, batches: Iterable, prepare: Callable, encode: Callable, threads: Optional[int] = None) -> np.ndarray:
        device, precision = self._device, self._precision

        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                with autocast(precision, device):
                    feats = encode(x.to(device, non_blocking=True))
                return F.normalize(feats.float(), dim=-1).cpu()

        def run(x: torch.Tensor) -> torch.Tensor:
            out, self._forward_batch_size = run_with_oom_backoff(forward, x, self._forward_batch_size)
            return out

        threads = self.prefetch_threads if threads is None else threads
        outs = pipelined(batches, prepare, run, threads)
        if not outs:
            return np.zeros((0, self._loaded.embed_dim), dtype=np.float32)
        return torch.cat(outs).numpy().astype(np.float32, copy=False)
