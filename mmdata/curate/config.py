"""The curation config: which deduplications and filters run, with their thresholds.

Every field has a default; ``mmdata curate --config curate.yaml`` reads the same fields from YAML.
A filter is off when its threshold is ``None``; a dedup method is off when its list is empty.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mmdata.config import read_yaml
from mmdata.errors import UserError

SEMANTIC_MODALITIES = ("image", "text", "audio", "pair")


class CurateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # where it runs (not part of what it writes)
    engine: Literal["local", "dask", "beam"] = Field("local", description="where the per-shard and per-cluster tasks run")
    workers: Optional[int] = Field(None, ge=1, description="worker processes (default: cores)")
    dask_address: Optional[str] = Field(None, description="Dask scheduler (tcp://host:8786); default: a LocalCluster")
    beam_options: list[str] = Field(default_factory=list, description="Beam pipeline options (--runner=…)")
    overwrite: bool = Field(False, description="replace an earlier curated output in --out")
    samples_per_shard: Optional[int] = Field(None, ge=1, description="kept samples per curated shard (default: the build's)")

    # deduplication
    exact: list[Literal["image", "text", "audio"]] = Field(
        default_factory=lambda: ["image", "text", "audio"],
        description="exact dedup: sha256 of the source bytes (image, audio) and of the normalised caption (text)")
    phash_max_distance: Optional[int] = Field(
        8, ge=-1, le=32, description="perceptual image dedup: Hamming distance ≤ this between 64-bit pHashes (-1 or None: off)")
    semantic: list[Literal["image", "text", "audio", "pair"]] = Field(
        default_factory=list, description="SemDeDup on these embeddings (pair: image and text embeddings together)")
    semantic_eps: float = Field(0.01, gt=0, lt=1, description="duplicates: cosine ≥ 1 - eps within a k-means cluster")
    semantic_eps_by_modality: dict[str, float] = Field(default_factory=dict, description="eps per modality, over semantic_eps")
    semantic_clusters: Optional[int] = Field(None, ge=1, description="k-means clusters (default: about n / 500)")
    semantic_keep: Literal["nearest", "farthest"] = Field(
        "nearest", description="which of a duplicate group stays: nearest its cluster centre (or farthest: SemDeDup's 'hard')")
    semantic_train_size: int = Field(100_000, ge=1, description="vectors k-means trains on at most (a seeded sample)")
    seed: int = Field(0, description="seed of the k-means sample and initialisation")

    # filters
    clip_min: Optional[float] = Field(None, ge=-1, le=1, description="filter pairs whose image·text cosine is below this")
    clip_top_fraction: Optional[float] = Field(None, gt=0, le=1, description="keep only this top fraction by CLIP score")
    languages: Optional[list[str]] = Field(None, description="keep captions detected in these languages (ISO 639-1)")
    language_min_score: float = Field(0.0, ge=0, le=1, description="a caption is in a listed language only with this confidence")
    min_words: Optional[int] = Field(None, ge=0, description="filter captions with fewer words")
    max_words: Optional[int] = Field(None, ge=1, description="filter captions with more words")
    tokenizer: Optional[str] = Field(None, description="a Hugging Face tokenizer.json: token counts in the table")
    tokens_member: bool = Field(False, description="also write {key}.llm_tokens.npy (int32 ids of the tokenizer) into kept samples")
    min_tokens: Optional[int] = Field(None, ge=0, description="filter captions with fewer tokens (needs tokenizer)")
    max_tokens: Optional[int] = Field(None, ge=1, description="filter captions with more tokens (needs tokenizer)")
    min_speech_ratio: Optional[float] = Field(None, ge=0, le=1, description="filter audio whose share of speech (Silero VAD) is below this")
    max_speech_ratio: Optional[float] = Field(None, ge=0, le=1, description="filter audio whose share of speech is above this")
    min_loudness: Optional[float] = Field(None, description="filter audio quieter than this integrated loudness (LUFS)")
    max_loudness: Optional[float] = Field(None, description="filter audio louder than this (LUFS)")
    max_clipping: Optional[float] = Field(None, ge=0, le=1, description="filter audio whose share of clipped samples is above this")
    exclude_near: Optional[str] = Field(None, description="another build (an evaluation set): remove samples near any of its samples")
    exclude_modality: Optional[Literal["image", "text", "audio", "fused"]] = Field(
        None, description="embeddings compared for exclude_near (default: image, else the first both builds have)")
    exclude_min_cosine: float = Field(0.95, ge=-1, le=1, description="exclude_near removes samples with cosine ≥ this")

    @field_validator("phash_max_distance")
    @classmethod
    def _off(cls, value: Optional[int]) -> Optional[int]:
        return None if value is not None and value < 0 else value

    def eps(self, modality: str) -> float:
        return self.semantic_eps_by_modality.get(modality, self.semantic_eps)

    def content_dict(self) -> dict:
        """The fields that decide the output (not where it runs)."""
        skip = {"engine", "workers", "dask_address", "beam_options", "overwrite"}
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in skip}


def load_curate_config(path: Optional[str] = None, **overrides) -> CurateConfig:
    """Defaults < YAML at ``path`` (a mapping, or its ``curate:`` section) < ``overrides``."""
    values: dict = {}
    if path:
        loaded = read_yaml(path)
        if isinstance(loaded, dict) and isinstance(loaded.get("curate"), dict):
            loaded = loaded["curate"]
        if not isinstance(loaded, dict):
            raise UserError(f"config {path} must be a mapping of field: value")
        values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
        values.pop("out", None)  # a build config's section names its folder; mmdata curate takes --out
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = CurateConfig(**values)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()]
        raise UserError(f"bad curate config: {'; '.join(parts)}") from None
    if (cfg.min_tokens is not None or cfg.max_tokens is not None or cfg.tokens_member) and not cfg.tokenizer:
        raise UserError("min_tokens / max_tokens / tokens_member need --tokenizer (a tokenizer.json)")
    bad = set(cfg.semantic_eps_by_modality) - set(SEMANTIC_MODALITIES)
    if bad:
        raise UserError(f"semantic_eps_by_modality: unknown modality {sorted(bad)[0]!r} (choose: {', '.join(SEMANTIC_MODALITIES)})")
    return cfg
