"""Curation of a finished build: deduplication (exact, perceptual, semantic per modality and per
pair) and filters (CLIP score, language, length, audio quality, decontamination), written as a new
build in the same layout with a ledger row for every sample removed."""
from mmdata.curate.config import CurateConfig, load_curate_config
from mmdata.curate.run import curate

__all__ = ["CurateConfig", "curate", "load_curate_config"]
