"""Encoders made from a build's configuration, or from the facts a build recorded: the open_clip
encoder, the audio encoder, and the check that the configured models can be had before a build starts."""
from __future__ import annotations

from typing import Optional

from mmdata.config import BuildConfig


def check_models(config: BuildConfig) -> None:
    """Fail before any unit runs when the configured open_clip model or its weights cannot be had
    (unknown architecture, tag not cached while offline, missing checkpoint): one UserError line.
    Cheap: nothing is loaded here; each worker still loads the model once itself."""
    if not config.model:
        return
    from mmdata.encoders.loading import check_model_name, resolve_weights

    check_model_name(config.model)
    if resolve_weights(config.model, config.pretrained).kind == "random":
        import logging

        logging.getLogger(__name__).warning(
            "%s has random weights (--pretrained random, seed %d): embeddings, index and search run, "
            "but neighbours mean nothing", config.model, config.model_seed)


def make_encoder(config: BuildConfig):
    """The configured open_clip encoder (model loaded in ``setup()``, once per process)."""
    from mmdata.encoders.clip import ClipEncoder

    pretrained = None if config.pretrained in (None, "random") else config.pretrained
    encoder = ClipEncoder(model=config.model, pretrained=pretrained, device=config.device, precision=config.precision,
                          batch_size=config.embed_batch_size, seed=config.model_seed)
    encoder.setup()
    return encoder


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
