"""Where and how an encoder's forward runs: device choice, mixed precision, CUDA OOM back-off.

Precision policy (weights always stay fp32; only the forward is autocast):

* CUDA: ``fp16``/``bf16`` run under ``torch.autocast("cuda", dtype)``.
* CPU: ``bf16`` runs under ``torch.autocast("cpu", torch.bfloat16)``; ``fp16`` has no useful CPU
  kernels, so it falls back to fp32 with a warning.

Embeddings are cast back to float32 and L2-normalised in float32 whatever the precision.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Literal

import torch

from mmdata.errors import UserError

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "bf16"]
PRECISIONS = ("fp32", "fp16", "bf16")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str = "auto") -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; an explicit CUDA device must exist."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} requested but torch sees no CUDA GPU: use --device auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise UserError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    return str(dev)


def effective_precision(precision: str, device: str) -> str:
    """The precision the forward will really use on ``device`` (see the module docstring)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and torch.device(device).type == "cpu":
        log.warning("precision fp16 is not supported on CPU; running the encoder in fp32")
        return "fp32"
    return precision


def autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    """The autocast context for an effective ``precision`` on ``device`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_DTYPES[precision])


def _release_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_with_oom_backoff(
    forward: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    batch_size: int,
) -> tuple[torch.Tensor, int]:
    """Run ``forward`` over ``inputs`` in chunks of ``batch_size`` rows, concatenated in order.

    On ``torch.cuda.OutOfMemoryError`` the batch size is halved and the failed chunk retried, down
    to 1; an OOM at batch size 1 is re-raised. Returns the outputs and the batch size that worked,
    which the caller keeps for later batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    outs: list[torch.Tensor] = []
    start, n = 0, len(inputs)
    while start < n:
        chunk = inputs[start : start + batch_size]
        oom = False
        try:
            out = forward(chunk)
        except torch.cuda.OutOfMemoryError as exc:
            if batch_size == 1:
                exc.add_note("mmdata: out of GPU memory at batch size 1; use a smaller model, "
                             "--precision fp16/bf16, or a GPU with more free memory")
                raise
            oom = True  # leave the except block first so the exception's frames can be freed
        if oom:
            batch_size //= 2
            _release_cuda_cache()
            log.warning("CUDA out of memory; retrying with encoder batch size %d", batch_size)
            continue
        outs.append(out)
        start += len(chunk)
    if not outs:
        return inputs.new_empty((0,)), batch_size
    return torch.cat(outs), batch_size
