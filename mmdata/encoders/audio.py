"""Audio embeddings: ``MelStatsEncoder`` (no model, pooled log-mel statistics) and ``ClapEncoder``
(a CLAP model through ``transformers``: audio and text in one space).

Both take a batch of ``(samples, sample_rate)`` pairs (``[frames]`` or ``[frames, channels]``
float32; channels are averaged) and return L2-normalised float32 rows, one per item, in order.
"""
from __future__ import annotations

import os
import socket
from typing import Sequence
from urllib.parse import urlparse

import numpy as np

from mmdata.errors import UserError

AudioItem = tuple[np.ndarray, int]


def _mono(samples: np.ndarray) -> np.ndarray:
    x = np.asarray(samples, dtype=np.float32)
    return x if x.ndim == 1 else x.mean(axis=1, dtype=np.float32)


def _resample(x: np.ndarray, sr: int, target: int) -> np.ndarray:
    import soxr

    return x if sr == target else soxr.resample(x, sr, target, quality="HQ").astype(np.float32, copy=False)


def _l2(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, np.float32(1e-12))


class MelStatsEncoder:
    """Per-band mean (minus the clip's mean level) and std of the log-mel spectrogram, plus the std
    of its frame-to-frame deltas: a cheap, model-free, loudness-invariant descriptor of timbre.

    It is not a learned embedding: neighbours are "sounds spectrally alike", not "means the same".
    A silent clip (no variation at all) maps to the constant unit vector.
    """

    name = "mel-stats"

    def __init__(self, sample_rate: int = 16000, n_mels: int = 64, n_fft: int = 512,
                 hop_length: int = 160, deltas: bool = True, batch_size: int = 64):
        from mmdata.transforms.audio import AudioConfig

        self.sample_rate, self.deltas = sample_rate, deltas
        self._mel_cfg = AudioConfig(sample_rate=sample_rate, n_mels=n_mels, n_fft=n_fft, hop_length=hop_length)

    def setup(self) -> None:
        """Nothing to load: the descriptor is model-free (every encoder has ``setup``)."""

    @property
    def dim(self) -> int:
        return self._mel_cfg.n_mels * (3 if self.deltas else 2)

    def info(self) -> dict:
        from mmdata.transforms.audio import mel_params

        return {"name": self.name, "dim": self.dim, "modality": "audio",
                "description": "mel-stats: pooled log-mel statistics, not a learned embedding",
                "params": {**mel_params(self._mel_cfg, self.sample_rate), "deltas": self.deltas}}

    def _features(self, samples: np.ndarray, sr: int) -> np.ndarray:
        from mmdata.transforms.audio import log_mel

        x = _resample(_mono(samples), sr, self.sample_rate)
        if len(x) < self._mel_cfg.n_fft:  # a clip shorter than one FFT window: pad with silence
            x = np.pad(x, (0, self._mel_cfg.n_fft - len(x)))
        mel = log_mel(x, self.sample_rate, self._mel_cfg).astype(np.float32)
        band_mean = mel.mean(axis=1)
        parts = [band_mean - band_mean.mean(), mel.std(axis=1)]
        if self.deltas:
            parts.append(np.diff(mel, axis=1).std(axis=1) if mel.shape[1] > 1 else np.zeros(len(mel), np.float32))
        vec = np.concatenate(parts).astype(np.float32)
        if not np.any(vec):
            vec = np.ones_like(vec)
        return vec

    def encode_audio(self, items: Sequence[AudioItem]) -> np.ndarray:
        if not items:
            return np.zeros((0, self.dim), np.float32)
        return _l2(np.stack([self._features(s, sr) for s, sr in items]))

    def __call__(self, items: Sequence[AudioItem]) -> np.ndarray:
        return self.encode_audio(items)


# One loaded CLAP per (model, device) per process: setup() on every stage instance is cheap.
_CLAP_CACHE: dict[tuple[str, str], tuple] = {}
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError)
_PROBE_TIMEOUT_S = 3.0
_SAVE_HINT = "a local folder saved with ClapModel.save_pretrained and ClapProcessor.save_pretrained"


def _one_line(exc: BaseException) -> str:
    line = " ".join(p.strip() for p in str(exc).splitlines() if p.strip()) or type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _hub_offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_reachable() -> bool:
    """A TCP connect to the hub within a few seconds (assumed reachable behind a proxy): without it
    transformers retries for half a minute before it gives up."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _load_clap(name_or_path: str, device: str):
    """Model, feature extractor and tokenizer, once per process; any failure is one ``UserError`` line."""
    key = (name_or_path, device)
    if key in _CLAP_CACHE:
        return _CLAP_CACHE[key]
    from transformers import ClapModel, ClapProcessor

    path = os.path.expanduser(name_or_path)
    is_path = os.path.isdir(path) or name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1

    def load(local_only: bool):
        return (ClapModel.from_pretrained(path, local_files_only=local_only),
                ClapProcessor.from_pretrained(path, local_files_only=local_only))

    if is_path and not os.path.isdir(path):
        raise UserError(f"CLAP checkpoint folder {name_or_path!r} does not exist: pass {_SAVE_HINT}")
    try:
        model, processor = load(local_only=True)  # a local folder, or a hub id already in the HF cache
    except _LOAD_ERRORS as exc:
        if is_path:
            raise UserError(f"cannot load CLAP model from {name_or_path!r} ({_one_line(exc)}): pass {_SAVE_HINT}") from None
        if _hub_offline() or not _hub_reachable():
            raise UserError(f"CLAP model {name_or_path!r} is not in the local Hugging Face cache and the hub is "
                            f"{'off (HF_HUB_OFFLINE)' if _hub_offline() else 'unreachable'}: download it into HF_HOME "
                            f"where there is network (unset HF_HUB_OFFLINE), or pass {_SAVE_HINT}") from None
        try:
            model, processor = load(local_only=False)
        except _LOAD_ERRORS as exc2:
            raise UserError(f"cannot load CLAP model {name_or_path!r} from the hub ({_one_line(exc2)}): "
                            f"check the id, or pass {_SAVE_HINT}") from None
    model.eval().to(device)
    _CLAP_CACHE[key] = (model, processor.feature_extractor, processor.tokenizer)
    return _CLAP_CACHE[key]


class ClapEncoder:
    """CLAP audio and text embeddings (``transformers.ClapModel``) in one shared space.

    Audio is downmixed, resampled to the feature extractor's rate (48 kHz for LAION CLAP) and cut to
    its first ``max_length_s`` seconds *before* feature extraction: CLAP's own truncation and
    fusion pick random crops, which would break determinism. Device and precision follow
    :mod:`mmdata.encoders.device` (fp32 weights, autocast forward, CUDA OOM halves the batch).
    """

    name = "clap"

    def __init__(self, name_or_path: str, device: str = "auto", precision: str = "fp32", batch_size: int = 32):
        from mmdata.encoders.device import effective_precision, resolve_device

        self.name_or_path = name_or_path
        self.device = resolve_device(device)
        self.precision = effective_precision(precision, self.device)
        self.batch_size = batch_size
        self._model = self._fe = self._tok = None

    def setup(self) -> None:
        if self._model is None:
            self._model, self._fe, self._tok = _load_clap(self.name_or_path, self.device)

    @property
    def sample_rate(self) -> int:
        self.setup()
        return int(self._fe.sampling_rate)

    @property
    def dim(self) -> int:
        self.setup()
        return int(self._model.config.projection_dim)

    def info(self) -> dict:
        self.setup()
        return {"name": self.name, "model": self.name_or_path, "dim": self.dim, "modality": "audio+text",
                "device": self.device, "precision": self.precision, "sample_rate": self.sample_rate,
                "max_length_s": float(self._fe.max_length_s),
                "description": "CLAP (transformers ClapModel): audio and text embeddings in one space"}

    def _run(self, n: int, forward) -> np.ndarray:
        import torch

        from mmdata.encoders.device import autocast, run_with_oom_backoff

        def chunk(idx: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), autocast(self.precision, self.device):
                return forward(idx.tolist()).float().cpu()

        out, self.batch_size = run_with_oom_backoff(chunk, torch.arange(n), self.batch_size)
        return _l2(out.numpy())

    def encode_audio(self, items: Sequence[AudioItem]) -> np.ndarray:
        """L2-normalised float32 ``[len(items), dim]`` audio embeddings."""
        import torch

        self.setup()
        if not items:
            return np.zeros((0, self.dim), np.float32)
        sr, max_len = self.sample_rate, int(self._fe.nb_max_samples)
        waves = [_resample(_mono(s), rate, sr)[:max_len] for s, rate in items]

        def forward(idx: list[int]) -> torch.Tensor:
            feats = self._fe([waves[i] for i in idx], sampling_rate=sr, return_tensors="pt")
            # The extractor marks a random clip "longer" when none is; nothing here is: say so.
            is_longer = torch.zeros((len(idx), 1), dtype=torch.bool, device=self.device)
            features = feats["input_features"].to(self.device, dtype=torch.float32)
            return _pooled(self._model.get_audio_features(input_features=features, is_longer=is_longer))

        return self._run(len(waves), forward)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 ``[len(texts), dim]`` text embeddings (same space as the audio)."""
        import torch

        self.setup()
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        # RoBERTa-style positions start after the padding index: two fewer usable positions.
        max_len = min(int(self._tok.model_max_length), int(self._model.config.text_config.max_position_embeddings) - 2)

        def forward(idx: list[int]) -> torch.Tensor:
            enc = self._tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            out = self._model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                                attention_mask=enc["attention_mask"].to(self.device))
            return _pooled(out)

        return self._run(len(texts), forward)

    def __call__(self, items: Sequence[AudioItem]) -> np.ndarray:
        return self.encode_audio(items)


def _pooled(out):
    """transformers 5 returns a model output whose pooler_output holds the projection; 4.x a tensor."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


def clear_cache() -> int:
    """Drop the loaded CLAP models (tests, or a worker switching models); returns how many."""
    n = len(_CLAP_CACHE)
    _CLAP_CACHE.clear()
    return n
