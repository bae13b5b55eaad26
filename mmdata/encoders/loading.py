"""Load an open_clip model once per process, or fail fast with one line that names the remedy.

``pretrained`` is an open_clip tag (``laion2b_s34b_b79k``), a local checkpoint path (air-gapped
clusters), or ``None``/``"random"`` (random init from ``seed``; tests). Tags whose weights are
already in the local cache (``HF_HOME``/``HF_HUB_CACHE``, ``~/.cache/clip``) load from that file
with the tag's preprocessing and never touch the network; a tag that is not cached is only handed
to open_clip for download when the hub is reachable, so an offline run fails in milliseconds
instead of retrying for a minute. Nothing ever falls back to another model.

Importing this module registers mmdata's own configs (``mmdata-tiny``) with open_clip.
"""
from __future__ import annotations

import difflib
import hashlib
import logging
import os
import pickle
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional
from urllib.parse import urlparse

import open_clip
import torch

from mmdata.errors import UserError

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
if not set(p.stem for p in CONFIG_DIR.glob("*.json")) <= set(open_clip.list_models()):
    open_clip.add_model_config(CONFIG_DIR)

RANDOM = "random"
_REMEDY = ("pass --pretrained /path/to/checkpoint.pt, pre-download the weights into HF_HOME, "
           "or run offline with random weights: --model mmdata-tiny --pretrained random")
_PROBE_TIMEOUT_S = 3.0
_CHECKPOINT_EXTS = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")

try:  # safetensors is how open_clip reads .safetensors checkpoints
    from safetensors import SafetensorError
except ImportError:  # pragma: no cover - optional dependency of open_clip
    class SafetensorError(Exception):
        pass

# What a broken user-supplied checkpoint can raise inside torch.load / load_state_dict.
_CHECKPOINT_ERRORS = (RuntimeError, OSError, ValueError, KeyError, EOFError, StopIteration,
                      pickle.UnpicklingError, SafetensorError)
# A tag's preprocessing → create_model_and_transforms' keyword for it.
_PREPROCESS_KWARGS = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
                      "resize_mode": "image_resize_mode"}


@dataclass(frozen=True)
class Weights:
    """Where a model's weights come from, resolved before anything heavy is loaded."""

    kind: Literal["random", "tag", "path"]
    label: str  # the tag, the absolute path, or "random"
    checkpoint: Optional[str] = None  # local file to load; None = random or download by open_clip
    preprocess: dict = field(default_factory=dict)  # a tag's preprocessing, as image_mean=... kwargs


@dataclass
class LoadedModel:
    """One process-wide model: the network in eval mode, its eval transform, tokenizer and facts."""

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    embed_dim: int
    info: dict[str, Any]


def _not_open_clips_random_warning(record: logging.LogRecord) -> bool:
    """open_clip warns "initialized randomly" in every process that loads random weights (inside
    the progress bar); the build warns once itself (``mmdata.encoders.factory.check_models``)."""
    return "initialized randomly" not in record.getMessage()


_CACHE: dict[tuple, LoadedModel] = {}
_LOCK = threading.Lock()


def _one_line(exc: BaseException) -> str:
    line = " ".join(part.strip() for part in str(exc).split("\n") if part.strip()) or type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _reachable(url: str) -> bool:
    """A TCP connect to ``url``'s host within a few seconds (skipped, i.e. True, behind a proxy)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _cached_hf_file(hf_hub: str) -> Optional[str]:
    """The local HF-cache file open_clip would download for ``org/repo/[file]``, if present."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo_id, filename = os.path.split(hf_hub)
    filename = filename or HF_WEIGHTS_NAME
    names = [HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME else []
    if filename != HF_WEIGHTS_NAME and filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")  # open_clip prefers safetensors, as here
    for name in [*names, filename]:
        hit = try_to_load_from_cache(repo_id, name)
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def _cached_url_file(url: str) -> Optional[str]:
    target = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
    return target if os.path.isfile(target) else None


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.lower().endswith(_CHECKPOINT_EXTS) or value.startswith("~")


def _has_schema(model: str) -> bool:
    return model.startswith(("hf-hub:", "local-dir:"))


def check_model_name(model: str) -> None:
    """Raise ``UserError`` unless open_clip knows ``model`` (schema-prefixed names pass through)."""
    if _has_schema(model):
        return
    known = open_clip.list_models()
    if model.replace("/", "-") in known:
        return
    close = difflib.get_close_matches(model, known, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "see open_clip.list_models()"
    raise UserError(f"unknown model {model!r}: not an open_clip model config; {hint}")


def resolve_weights(model: str, pretrained: Optional[str]) -> Weights:
    """Decide where the weights come from, raising ``UserError`` now if they cannot be had."""
    if _has_schema(model):  # the weights come with the model id; open_clip ignores `pretrained`
        if model.startswith("hf-hub:"):
            _check_hf_repo(model[len("hf-hub:"):])
        return Weights("tag", model)
    if pretrained is None or pretrained == RANDOM:
        return Weights("random", RANDOM)
    name = model.replace("/", "-")
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if cfg:
        return _resolve_tag(model, pretrained, cfg)
    path = os.path.abspath(os.path.expanduser(pretrained))
    if os.path.isfile(path):
        return Weights("path", path, checkpoint=path)
    if _looks_like_path(pretrained):
        raise UserError(f"cannot load {model}: checkpoint {pretrained!r} not found; "
                        f"pass an existing checkpoint file to --pretrained")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if not tags:
        raise UserError(f"cannot load {model}: it has no pretrained tags and {pretrained!r} is not a checkpoint "
                        f"file; pass --pretrained random (random weights: tests, the offline demo) "
                        f"or --pretrained /path/to/checkpoint.pt")
    known = ", ".join(tags[:6]) + (f", ... ({len(tags)} in all)" if len(tags) > 6 else "") if tags else "none"
    raise UserError(f"cannot load {model}: {pretrained!r} is neither a pretrained tag of this model "
                    f"(known: {known}) nor a checkpoint file; pass a tag, a checkpoint path or random")


def _resolve_tag(model: str, tag: str, cfg: dict) -> Weights:
    preprocess = {_PREPROCESS_KWARGS[k]: v for k, v in cfg.items() if k in _PREPROCESS_KWARGS and v is not None}
    if cfg.get("file"):
        return Weights("tag", tag, checkpoint=cfg["file"], preprocess=preprocess)
    cached = (_cached_hf_file(cfg["hf_hub"]) if cfg.get("hf_hub") else None) or \
             (_cached_url_file(cfg["url"]) if cfg.get("url") else None)
    if cached:
        return Weights("tag", tag, checkpoint=cached, preprocess=preprocess)
    if cfg.get("hf_hub"):
        from huggingface_hub import constants

        source, where = "model hub", constants.ENDPOINT
    else:
        source, where = "download host", cfg.get("url", "")
    if _hub_offline() and cfg.get("hf_hub"):
        raise UserError(f"cannot load {model}/{tag}: no model hub access (HF_HUB_OFFLINE=1) and the weights "
                        f"are not in the local cache; {_REMEDY}")
    if not _reachable(where):
        raise UserError(f"cannot load {model}/{tag}: {source} {urlparse(where).hostname} unreachable "
                        f"(no network) and the weights are not in the local cache; {_REMEDY}")
    return Weights("tag", tag)  # open_clip downloads it


def _check_hf_repo(repo_id: str) -> None:
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "open_clip_config.json"), str):
        return
    if _hub_offline() or not _reachable(constants.ENDPOINT):
        raise UserError(f"cannot load hf-hub:{repo_id}: no model hub access (HF_HUB_OFFLINE=1 or no network) "
                        f"and it is not in the local cache; use local-dir:/path or pre-download into HF_HOME")


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """The file's sha256, read in chunks (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_key(model: str, weights: Weights, device: str, precision: str, seed: int) -> tuple:
    """One model per (model, pretrained, device, precision); random weights also key on the seed."""
    return (model, weights.label, device, precision, seed if weights.kind == "random" else None)


def load_model(model: str, pretrained: Optional[str], device: str, precision: str, seed: int = 0) -> LoadedModel:
    """The process-wide model for these arguments, loaded on first use (thread-safe)."""
    check_model_name(model)
    weights = resolve_weights(model, pretrained)
    key = cache_key(model, weights, device, precision, seed)
    with _LOCK:
        loaded = _CACHE.get(key)
        if loaded is None:
            loaded = _CACHE[key] = _load(model, weights, device, precision, seed)
        return loaded


def clear_model_cache() -> None:
    """Forget every cached model (tests; freeing GPU memory between jobs in one process)."""
    with _LOCK:
        _CACHE.clear()


def _load(model: str, weights: Weights, device: str, precision: str, seed: int) -> LoadedModel:
    kwargs: dict[str, Any] = dict(device=device, precision="fp32")  # weights fp32; autocast at forward
    if weights.checkpoint:
        kwargs.update(pretrained=weights.checkpoint, **weights.preprocess)
    elif weights.kind == "tag" and not _has_schema(model):
        kwargs.update(pretrained=weights.label)
    what = f"{model} from {weights.label}" if weights.kind == "path" else f"{model}/{weights.label}"
    try:
        if weights.kind == "random":
            # Seed only the CPU generator, and restore it after: deterministic weights, no global side effect.
            root = logging.getLogger()
            root.addFilter(_not_open_clips_random_warning)
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(seed)
                    net, _, preprocess = open_clip.create_model_and_transforms(model, **kwargs)
            finally:
                root.removeFilter(_not_open_clips_random_warning)
        else:
            net, _, preprocess = open_clip.create_model_and_transforms(model, **kwargs)
    except _CHECKPOINT_ERRORS as exc:
        why = "unreadable, or not a checkpoint of this model" if weights.checkpoint else "open_clip could not build it"
        raise UserError(f"cannot load {what}: {why} ({_one_line(exc)}); "
                        f"pass a checkpoint saved from this model to --pretrained") from None
    try:
        tokenizer = open_clip.get_tokenizer(model)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot load the tokenizer of {model}: {_one_line(exc)}; "
                        f"pre-download it into HF_HOME") from None
    net.eval()
    checkpoint = weights.checkpoint
    if weights.kind == "tag" and not checkpoint and not _has_schema(model):  # freshly downloaded by open_clip: find it for the record
        cfg = open_clip.get_pretrained_cfg(model.replace("/", "-"), weights.label)
        checkpoint = (_cached_hf_file(cfg["hf_hub"]) if cfg.get("hf_hub") else None) or \
                     (_cached_url_file(cfg["url"]) if cfg.get("url") else None)
    embed_dim = _embed_dim(model, net)
    info = {
        "model": model,
        "pretrained": weights.label,
        "weights": weights.kind,
        "checkpoint": checkpoint,
        "checkpoint_sha256": sha256_file(checkpoint) if checkpoint and os.path.isfile(checkpoint) else None,
        "seed": seed if weights.kind == "random" else None,
        "embed_dim": embed_dim,
        "image_size": _image_size(net),
        "context_length": getattr(tokenizer, "context_length", None),
        "device": device,
        "precision": precision,
        "open_clip_version": open_clip.__version__,
        "torch_version": torch.__version__,
    }
    log.info("loaded %s on %s (%s, dim %d)", what, device, precision, embed_dim)
    return LoadedModel(net, preprocess, tokenizer, embed_dim, info)


def _embed_dim(model: str, net: torch.nn.Module) -> int:
    cfg = None if _has_schema(model) else open_clip.get_model_config(model.replace("/", "-"))
    if cfg and "embed_dim" in cfg:
        return int(cfg["embed_dim"])
    return int(net.visual.output_dim)


def _image_size(net: torch.nn.Module) -> Optional[int]:
    size = getattr(getattr(net, "visual", None), "image_size", None)
    return int(size[0]) if isinstance(size, (tuple, list)) else size
