"""The set-up an encoder runs with, recorded beside the model: device kind, precision, torch threads.

The same weights give embeddings that differ in the last bits with the device (cpu, cuda, mps),
the precision of the forward and, on CPU, torch's thread count (reductions are blocked by thread).
Each unit records these facts with its encoder facts, and a resume (``mmdata build`` or
``mmdata embed``) compares them with its own: vectors of two set-ups are never mixed in one output.
"""
from __future__ import annotations

from typing import Optional

from mmdata.config import BuildConfig

SETUP_FACTS = ("device", "precision", "torch_threads")
# What identifies the model behind open_clip embeddings (batch size and the exact GPU index do not).
MODEL_FACTS = ("model", "pretrained", "weights", "checkpoint_sha256", "seed", "embed_dim", "open_clip_version")
ENCODER_FACTS = MODEL_FACTS + SETUP_FACTS
NOT_RECORDED = "not recorded"


def fix_torch_threads(n: int) -> None:
    """Fix torch's intra-op thread count of this process to ``n`` (each worker does, before encoding)."""
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def device_kind(device: str) -> str:
    """``cuda:1`` → ``cuda``; ``auto`` resolved first (CUDA when torch sees one)."""
    import torch

    from mmdata.encoders.device import resolve_device

    return torch.device(resolve_device(device)).type


def setup_facts(config: BuildConfig) -> dict:
    """This process's set-up for ``config``: the device kind ``auto`` resolves to here, the precision
    the forward really uses there (fp16 runs as fp32 on CPU), the fixed torch thread count."""
    kind = device_kind(config.device)
    precision = "fp32" if config.precision == "fp16" and kind == "cpu" else config.precision
    return {"device": kind, "precision": precision, "torch_threads": config.torch_threads}


def worker_setup_facts(config: BuildConfig) -> dict:
    """``setup_facts`` as an engine task: the set-up of the machines the units run on (a Dask or Beam
    worker may see a GPU the driver lacks)."""
    return setup_facts(config)


def encoder_facts(info: dict, setup: dict) -> dict:
    """The facts a unit records for its open_clip encoder: ``ENCODER_FACTS`` of its info and set-up."""
    merged = {**info, **setup}
    return {k: merged.get(k) for k in ENCODER_FACTS}


def facts_difference(before: Optional[dict], now: dict, keys=ENCODER_FACTS) -> Optional[str]:
    """``device: cuda → cpu`` (every differing fact, ``; ``-separated), or None when they agree on ``keys``."""
    before = before or {}
    diffs = [f"{k}: {before.get(k, NOT_RECORDED)} → {now.get(k, NOT_RECORDED)}"
             for k in keys if before.get(k, NOT_RECORDED) != now.get(k, NOT_RECORDED)]
    return "; ".join(diffs) or None
