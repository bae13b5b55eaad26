"""Decoded samples → one batch dict of tensors and lists.

A modality that some samples of the batch lack is zero-filled and ``present[modality]`` says which
rows are real; one that no sample has is left out of the batch.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch


def _stack(values: list, present: list[bool]) -> torch.Tensor:
    first = next(v for v, p in zip(values, present) if p)
    first = torch.as_tensor(first)
    rows = [torch.as_tensor(v) if p else torch.zeros_like(first) for v, p in zip(values, present)]
    return torch.stack(rows)


def collate(samples: Sequence[dict]) -> dict[str, Any]:
    """Batch of ``SampleDecoder`` outputs: tensors stacked on a leading batch axis."""
    batch: dict[str, Any] = {
        "__key__": [s["__key__"] for s in samples],
        "id": torch.tensor([s["id"] for s in samples], dtype=torch.int64),
        "json": [s["json"] for s in samples],
        "repeat": torch.tensor([bool(s["repeat"]) for s in samples]),
        "shard": [s["shard"] for s in samples],
        "row": torch.tensor([s["row"] for s in samples], dtype=torch.int64),
    }
    present: dict[str, torch.Tensor] = {}
    for name, mask_name in (("image", None), ("tokens", None), ("audio", "audio_mask"), ("mel", "mel_mask")):
        has = [name in s for s in samples]
        if not any(has):
            continue
        values = [s.get(name) for s in samples]
        if name == "image" and not isinstance(next(v for v in values if v is not None), (torch.Tensor, np.ndarray)):
            batch[name] = values  # no transform: PIL images stay a list
        else:
            batch[name] = _stack(values, has)
        if mask_name:
            batch[mask_name] = _stack([s.get(mask_name) for s in samples], has)
        present[name] = torch.tensor(has)
    if any("text" in s for s in samples):
        batch["text"] = [s.get("text") for s in samples]
        present["text"] = torch.tensor(["text" in s for s in samples])
    if any("sample_rate" in s for s in samples):
        rates = {s["sample_rate"] for s in samples if "sample_rate" in s}
        if len(rates) > 1:
            raise ValueError(f"audio sample rates differ within a batch ({sorted(rates)}): pass sample_rate= to the loader")
        batch["sample_rate"] = rates.pop()
    if any("augment" in s for s in samples):
        batch["augment"] = [s.get("augment") for s in samples]
    if samples and "embeddings" in samples[0]:
        batch["embeddings"] = {m: torch.from_numpy(np.stack([s["embeddings"][m] for s in samples]))
                               for m in samples[0]["embeddings"]}  # a zero row: the sample lacks m
    batch["present"] = present
    return batch
