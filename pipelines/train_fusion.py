"""Train a small fusion model on a build: image, text and audio inputs projected into one space with
a contrastive (InfoNCE) loss between every pair of modalities; FAISS neighbours as hard negatives.

    python -m pipelines.train_fusion OUT --steps 300 --out ckpt.pt [--hard-negatives 4]

Each modality is fed by its stored embedding (``embeddings/<modality>/``) when the build has one,
else by features from the shards: pixels (a small CNN), token ids (a bag of embeddings), log-mel
(mean and std over time). ``--features`` ignores stored embeddings. It runs on the CPU in minutes;
start from it for a real model: swap the encoders, keep the loader and the loss.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mmdata.errors import UserError
from mmdata.loader import make_loader
from mmdata.loader.store import embedded_modalities
from mmdata.storage import OutputDir

FUSED = ("image", "text", "audio")
TOKEN_BUCKETS = 4096  # rows of the hashed token table


@dataclass
class FusionConfig:
    """What the model consumes, per modality: ("emb", dim) | ("pixels", size) | ("tokens", buckets) | ("mel", n_mels)."""

    inputs: dict = field(default_factory=dict)
    dim: int = 64
    hidden: int = 256


class PixelEncoder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.GELU(), nn.Conv2d(16, 32, 3, 2, 1), nn.GELU(),
                                 nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(64, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TokenEncoder(nn.Module):
    """A hashed bag of words: token ids folded into ``buckets`` rows (0 stays padding), averaged, mapped.
    A full 49408-row table would make every optimiser step update millions of untouched weights."""

    def __init__(self, buckets: int, width: int, dim: int):
        super().__init__()
        self.buckets = buckets
        self.bag = nn.EmbeddingBag(buckets, width, mode="mean", padding_idx=0)
        self.out = nn.Sequential(nn.GELU(), nn.Linear(width, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = torch.where(tokens > 0, tokens % (self.buckets - 1) + 1, torch.zeros_like(tokens))
        return self.out(self.bag(ids))


class MelEncoder(nn.Module):
    """Mean and standard deviation of each mel band over the real frames, then an MLP."""

    def __init__(self, n_mels: int, hidden: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * n_mels, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, mel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[:, None, :].float()
        n = m.sum(-1).clamp(min=1)
        mean = (mel * m).sum(-1) / n
        std = (((mel - mean[..., None]) ** 2 * m).sum(-1) / n).sqrt()
        return self.mlp(torch.cat([mean, std], dim=1) / 40.0)  # log-mel dB → O(1)


def _mlp(d: int, hidden: int, dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, dim))


class FusionModel(nn.Module):
    """One encoder per modality into a shared ``dim``-space, L2-normalised; a learned temperature."""

    def __init__(self, config: FusionConfig):
        super().__init__()
        self.config = config
        enc = {}
        for m, (kind, size) in config.inputs.items():
            if kind == "emb":
                enc[m] = _mlp(size, config.hidden, config.dim)
            elif kind == "pixels":
                enc[m] = PixelEncoder(config.dim)
            elif kind == "tokens":
                enc[m] = TokenEncoder(size, config.hidden, config.dim)
            elif kind == "mel":
                enc[m] = MelEncoder(size, config.hidden, config.dim)
            else:
                raise ValueError(f"unknown input kind {kind!r}")
        self.encoders = nn.ModuleDict(enc)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode(self, batch: dict) -> tuple[dict, dict]:
        """({modality: (B, dim) unit rows}, {modality: (B,) bool present})."""
        z, present = {}, {}
        for m, (kind, _) in self.config.inputs.items():
            if kind == "emb":
                x = batch["embeddings"][m]
                z[m], present[m] = self.encoders[m](x), x.abs().sum(1) > 0
            elif kind == "pixels":
                z[m], present[m] = self.encoders[m](batch["image"]), batch["present"]["image"]
            elif kind == "tokens":
                z[m], present[m] = self.encoders[m](batch["tokens"]), batch["present"]["tokens"]
            else:
                z[m], present[m] = self.encoders[m](batch["mel"], batch["mel_mask"]), batch["present"]["mel"]
            z[m] = F.normalize(z[m], dim=-1)
        return z, present

    def project(self, modality: str, vectors: torch.Tensor) -> torch.Tensor:
        """Stored embeddings of ``modality`` (any leading shape) → unit rows of the shared space."""
        return F.normalize(self.encoders[modality](vectors), dim=-1)

    def fuse(self, z: dict) -> torch.Tensor:
        """The fused embedding: mean of the modality embeddings, renormalised."""
        return F.normalize(torch.stack(list(z.values())).mean(0), dim=-1)


def info_nce(za: torch.Tensor, zb: torch.Tensor, scale: torch.Tensor, extra_b: Optional[torch.Tensor] = None,
             extra_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Symmetric InfoNCE of paired rows; ``extra_b`` (B, k, dim) adds per-row hard negatives to a→b."""
    logits = scale * za @ zb.T
    target = torch.arange(len(za))
    a_to_b = logits
    if extra_b is not None:
        hard = scale * torch.einsum("bd,bkd->bk", za, extra_b)
        hard = hard.masked_fill(~extra_mask, float("-inf"))
        a_to_b = torch.cat([logits, hard], dim=1)
    return (F.cross_entropy(a_to_b, target) + F.cross_entropy(logits.T, target)) / 2


def fusion_loss(model: FusionModel, batch: dict) -> torch.Tensor:
    """Mean InfoNCE over every pair of modalities, on the rows that have both."""
    z, present = model.encode(batch)
    scale = model.logit_scale.exp().clamp(max=100)
    nb = batch.get("neighbours")
    losses = []
    for a, b in itertools.combinations(sorted(z), 2):
        both = present[a] & present[b]
        if both.sum() < 2:
            continue
        za, zb = z[a][both], z[b][both]
        if nb is not None and b in nb["embeddings"] and model.config.inputs[b][0] == "emb":
            extra = model.project(b, nb["embeddings"][b][both])
            losses.append(info_nce(za, zb, scale, extra, nb["mask"][both]))
        else:
            losses.append(info_nce(za, zb, scale))
    if not losses:
        raise UserError("no batch row has two modalities to contrast")
    return torch.stack(losses).mean()


def plan_inputs(out: str, features: bool = False) -> tuple[FusionConfig, dict]:
    """Choose each modality's input from what the build stores; returns the config and loader kwargs."""
    stored = [m for m in embedded_modalities(OutputDir(out)) if m in FUSED] if not features else []
    wanted = [m for m in ("image", "text") if m not in stored] + ([] if "audio" in stored else ["mel"])
    probe = next(iter(make_loader(out, modalities=wanted, batch_size=1, num_workers=0, shuffle_buffer=0,
                                  embeddings=stored, shuffle_shards=False)))
    inputs, modalities = {}, []
    for m in stored:
        inputs[m] = ("emb", probe["embeddings"][m].shape[1])
    if "image" not in inputs and "image" in probe:
        inputs["image"], modalities = ("pixels", probe["image"].shape[-1]), modalities + ["image"]
    if "text" not in inputs and "tokens" in probe:
        inputs["text"], modalities = ("tokens", TOKEN_BUCKETS), modalities + ["text"]
    if "audio" not in inputs and "mel" in probe:
        inputs["audio"], modalities = ("mel", probe["mel"].shape[1]), modalities + ["mel"]
    if len(inputs) < 2:
        raise UserError(f"{out} offers fewer than two modalities to contrast ({', '.join(inputs) or 'none'})")
    return FusionConfig(inputs=inputs), {"modalities": modalities, "embeddings": stored}


def train(out: str, steps: int = 300, batch_size: int = 32, lr: float = 2e-3, dim: int = 64, hidden: int = 256,
          hard_negatives: int = 0, neighbour_modality: str = "image", num_workers: int = 2, seed: int = 0,
          features: bool = False, ckpt: Optional[str] = None, progress: bool = True, log_every: int = 50,
          threads: Optional[int] = 1) -> dict:
    """Train for ``steps`` batches; returns {"losses", "model", "config"} and saves ``ckpt`` if given.

    ``threads``: torch threads of the training process (None: torch's default). One is fastest for
    this small model — on a busy machine several threads spin against each other.
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    config, kwargs = plan_inputs(out, features)
    config.dim, config.hidden = dim, hidden
    if hard_negatives:
        kwargs.update(neighbours=hard_negatives, neighbour_modality=neighbour_modality,
                      neighbour_embeddings=[m for m, (kind, _) in config.inputs.items() if kind == "emb"])
    loader = make_loader(out, batch_size=batch_size, num_workers=num_workers, seed=seed, drop_last=True, **kwargs)
    if len(loader) == 0:
        raise UserError(f"{out} has fewer samples per loader worker than one batch of {batch_size}: lower --batch-size")
    model = FusionModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    losses: list[float] = []
    bar = tqdm(total=steps, desc="train", unit="step", disable=not progress, file=sys.stderr)
    model.train()
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        for batch in loader:
            loss = fusion_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", epoch=epoch)
            if log_every and len(losses) % log_every == 0:
                bar.write(f"step {len(losses)}  loss {sum(losses[-log_every:]) / log_every:.4f}")
            if len(losses) == steps:
                break
        if len(losses) == steps:
            break
    bar.close()
    model.eval()
    result = {"losses": losses, "model": model, "config": config}
    if ckpt:
        torch.save({"model": model.state_dict(), "config": asdict(config), "steps": steps, "losses": losses,
                    "data": out, "hard_negatives": hard_negatives}, ckpt)
    return result


def load_model(path: str) -> FusionModel:
    """A FusionModel from a checkpoint written by ``train``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = FusionModel(FusionConfig(**state["config"]))
    model.load_state_dict(state["model"])
    return model.eval()


@torch.no_grad()
def evaluate(model: FusionModel, out: str, query: str = "text", target: str = "image", label_key: str = "label",
             num_workers: int = 0) -> dict:
    """Retrieval over the whole build: each ``query`` row's nearest ``target`` row. ``top1``: it is the
    sample's own; ``label_top1``: it has the same ``label_key`` in the sample json (top level or under
    ``meta``, where a build keeps the corpus's own metadata), when every sample carries one."""
    config = model.config
    mods = [{"pixels": "image", "tokens": "text", "mel": "mel"}[k] for k, _ in config.inputs.values() if k != "emb"]
    embs = [m for m, (k, _) in config.inputs.items() if k == "emb"]
    loader = make_loader(out, modalities=mods, batch_size=256, shuffle_buffer=0, num_workers=num_workers,
                         embeddings=embs, shuffle_shards=False)
    zq, zt, labels = [], [], []
    for batch in loader:
        z, _ = model.encode(batch)
        zq.append(z[query])
        zt.append(z[target])
        labels += [j.get(label_key, (j.get("meta") or {}).get(label_key)) for j in batch["json"]]
    zq, zt = torch.cat(zq), torch.cat(zt)
    best = (zq @ zt.T).argmax(1)
    n = len(zq)
    result = {"samples": n, "top1": float((best == torch.arange(n)).float().mean()), "chance": 1 / n}
    if all(lab is not None for lab in labels):
        codes: dict = {}
        lab = torch.tensor([codes.setdefault(json.dumps(x, sort_keys=True), len(codes)) for x in labels])
        result["label_top1"] = float((lab[best] == lab).float().mean())
        result["label_chance"] = float(sum((lab == v).float().mean() ** 2 for v in lab.unique()))
    return result


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="a build's output folder (mmdata build --model … for stored embeddings)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="fusion.pt", help="checkpoint path")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--hard-negatives", type=int, default=0, help="k FAISS neighbours per sample as extra negatives")
    p.add_argument("--neighbour-modality", default="image")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default); raise for bigger encoders")
    p.add_argument("--features", action="store_true", help="train on pixels/tokens/mel, not stored embeddings")
    args = p.parse_args(argv)
    try:
        res = train(args.data, steps=args.steps, batch_size=args.batch_size, lr=args.lr, dim=args.dim,
                    hard_negatives=args.hard_negatives, neighbour_modality=args.neighbour_modality,
                    num_workers=args.workers, seed=args.seed, features=args.features, ckpt=args.out,
                    threads=args.threads or None)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    losses = res["losses"]
    head, tail = losses[:10], losses[-10:]
    print(f"loss {sum(head) / len(head):.3f} → {sum(tail) / len(tail):.3f} over {len(losses)} steps; checkpoint {args.out}")
    mods = sorted(res["config"].inputs)
    if len(mods) >= 2:
        q, t = ("text", "image") if {"text", "image"} <= set(mods) else (mods[0], mods[1])
        print(f"retrieval {q}→{t}: {evaluate(res['model'], args.data, q, t)}")


if __name__ == "__main__":
    main()
