"""The build configuration: one pydantic model, filled from defaults < YAML file < CLI flags.

``config_hash`` covers only the fields that change the output, so a resumed run with another
worker count or engine still recognises its committed shards.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mmdata.augment.config import AugmentConfig, load_augment_config
from mmdata.errors import UserError
from mmdata.transforms.audio_config import AudioConfig

MODALITIES = ("image", "text", "audio")

# Fields that decide *where* or *how fast* the job runs, not *what* it writes.
RUNTIME_FIELDS = frozenset({"out", "workers", "engine", "overwrite", "progress", "dask_address", "beam_options",
                            "dask_gpu_resource", "dask_retries",
                            "device", "embed_batch_size", "index_memory_gb", "index_recall_target",
                            "index_key", "index_distributed", "curate", "torch_threads",
                            "reembed_mismatched", "report"})

# Download fields that decide how fast and how politely, not which samples are written (retry knobs
# included: --retry-failed may raise them), and the ones that do decide, which stay out of the hash at
# their defaults so builds made before downloads existed keep their hash.
DOWNLOAD_RUNTIME_FIELDS = frozenset({"download_threads", "connect_timeout", "read_timeout", "download_timeout",
                                     "download_retries", "retry_after_max", "user_agent", "contact_url",
                                     "per_domain_connections", "per_domain_rps", "retry_failed"})
DOWNLOAD_CONTENT_FIELDS = ("max_download_bytes", "max_redirects", "allow_private_addresses", "optout_directives",
                           "respect_robots_txt")
RUNTIME_FIELDS = RUNTIME_FIELDS | DOWNLOAD_RUNTIME_FIELDS

AUGMENT_FIELDS = frozenset({"augment", "views", "augment_seed", "keep_originals", "embed_views"})


class BuildConfig(BaseModel):
    """Everything ``mmdata build`` needs. Every field is also a CLI flag (``image_size`` → ``--image-size``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = Field(description="folder or manifest (parquet/csv/tsv/jsonl), any fsspec URL")
    out: str = Field(description="output folder, any fsspec URL")
    # scheduling
    engine: Literal["local", "dask", "beam"] = Field("local", description="where units run: local processes, a Dask cluster or a Beam runner")
    workers: Optional[int] = Field(None, ge=1, description="worker processes (default: cores)")
    overwrite: bool = Field(False, description="rebuild from scratch instead of resuming")
    progress: bool = Field(True, description="show a progress bar")
    report: bool = Field(True, description="write report.html at finalize (mmdata report OUT re-makes it)")
    dask_address: Optional[str] = Field(None, description="Dask scheduler (tcp://host:8786); default: a LocalCluster")
    dask_gpu_resource: Optional[str] = Field(None, description="Dask worker resource a unit needs (e.g. GPU)")
    dask_retries: int = Field(3, ge=0, le=100, description="times Dask retries a unit that raised")
    beam_options: list[str] = Field(default_factory=list, description="Beam pipeline options (--runner=…)")
    # plan
    samples_per_shard: int = Field(1000, ge=1, le=1_000_000, description="records per work unit / shard")
    image_col: str = Field("image", description="manifest column with image paths/URLs")
    text_col: str = Field("caption", description="manifest column with captions")
    key_col: Optional[str] = Field(None, description="manifest column with sample keys (default: from the image path)")
    audio_col: Optional[str] = Field(None, description="manifest column with audio paths/URLs (default: none; "
                                                       "with --require audio for audio-only manifests)")
    require: list[Literal["image", "text", "audio"]] = Field(default_factory=lambda: ["image", "text"], description="modalities a record must have")
    # image
    image_size: int = Field(256, ge=8, le=16384, description="target size in pixels")
    resize_mode: Literal["no", "keep_ratio", "center_crop", "border"] = Field("keep_ratio", description="how images are fitted to image_size")
    resize_only_if_bigger: bool = Field(False, description="never upscale (--resize-always also upscales)")
    image_format: Literal["jpg", "png", "webp"] = Field("jpg", description="format of {key}.<ext> in the shards")
    image_quality: int = Field(95, ge=1, le=100, description="jpg/webp quality 1-100")
    jpeg_codec: Literal["pillow", "simplejpeg", "auto"] = Field(
        "auto", validate_default=True, description="JPEG decode/encode library: pillow, or simplejpeg (libjpeg-turbo, extra 'fast': "
        "DCT scaling in 1/8 steps, faster); auto = simplejpeg when installed, else pillow. Part of the config hash: "
        "the two give different (each deterministic) bytes")
    resize_backend: Literal["pillow", "opencv", "auto"] = Field(
        "auto", validate_default=True, description="resize library: pillow (Lanczos), or opencv (extra 'fast'; INTER_AREA down, "
        "INTER_LANCZOS4 up, as img2dataset; faster, slightly softer); auto = opencv when installed, else pillow. "
        "Part of the config hash")
    min_image_size: int = Field(0, ge=0, description="filter images whose smaller side is below this")
    max_aspect_ratio: Optional[float] = Field(None, ge=1.0, description="filter images more elongated than this")
    max_pixels: int = Field(100_000_000, ge=1, description="decompression-bomb guard, checked on the header")
    max_source_bytes: int = Field(256 * 2**20, ge=1, description="source files bigger than this (bytes, per file; "
                                  "checked on the file's size before reading) fail as too_large:source")
    # text
    min_caption_chars: int = Field(1, ge=0, description="filter captions shorter than this")
    max_caption_chars: int = Field(4096, ge=1, description="longer captions are truncated (recorded)")
    max_sidecar_bytes: int = Field(4 * 2**20, ge=1, description="largest caption (.txt), .json sidecar or transcript "
                                   "read, in bytes; a larger one is a failed row too_large:<modality>")
    tokenize: bool = Field(False, description="write {key}.tokens.npy")
    tokenizer: str = Field("ViT-B-32", description="open_clip model whose tokenizer writes {key}.tokens.npy")
    # audio: how clips and segments are stored (YAML ``audio:`` mapping; flat flags --sample-rate, --mel …)
    audio: AudioConfig = Field(default_factory=AudioConfig)
    # timed transcripts (.srt, .vtt, .json beside an audio file): one sample per segment
    segment_pad: float = Field(0.0, ge=0, le=60, description="seconds of audio kept before and after each segment")
    segment_offset: float = Field(0.0, ge=-86400, le=86400, description="seconds added to every transcript time")
    min_segment: float = Field(0.0, ge=0, description="shorter segments merge with a neighbour (else filtered)")
    max_segment: Optional[float] = Field(None, gt=0, description="longer segments are split at a pause (else filtered)")
    max_merge_gap: float = Field(1.0, ge=0, description="seconds of silence across which short segments merge")
    # offline augmentation: N seeded views per written sample, written as <key>_v01 … (mmdata/pipeline/samples/views.py)
    augment: Optional[AugmentConfig] = Field(None, description="augment ops: a mapping, or the path of a YAML file")
    views: Optional[int] = Field(None, ge=0, le=99, description="augmented views per sample (default: the augment config's views)")
    augment_seed: Optional[int] = Field(None, description="seed of the views (flag --seed; default: the augment config's seed)")
    keep_originals: bool = Field(True, description="also write the originals (else their rows are filtered replaced:views)")
    embed_views: bool = Field(False, description="embed the views like originals (else their embedding rows are zero)")
    # embeddings (an open_clip model; none by default)
    model: Optional[str] = Field(None, description="open_clip model for image/text embeddings, e.g. ViT-B-32")
    pretrained: Optional[str] = Field("laion2b_s34b_b79k", description="open_clip tag, local checkpoint path, or 'random' (tests)")
    model_seed: int = Field(0, description="seed of random weights when pretrained is 'random'")
    embed: list[Literal["image", "text"]] = Field(default_factory=lambda: ["image", "text"], description="modalities to embed with the open_clip model")
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="encoder precision (autocast on GPU)")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:1 …")
    embed_batch_size: int = Field(64, ge=1, description="encoder batch size (halved on CUDA out-of-memory)")
    torch_threads: int = Field(1, ge=1, le=1024, description="torch threads of each worker's encoder, fixed (the count "
                               "changes embedding bits on CPU; recorded with the embeddings). Raise it with few workers")
    reembed_mismatched: bool = Field(False, description="re-embed committed units whose encoder set-up (device kind, "
                                     "precision, torch threads) differs from this run's, instead of refusing to resume")
    embedding_dtype: Literal["float16", "float32"] = Field("float16", description="dtype of embeddings/<modality>/*.npy")
    embed_in_shards: bool = Field(False, description="also store {key}.<modality>_emb.npy in the samples")
    fused: Optional[Literal["mean"]] = Field(None, description="also write a fused embedding: mean of the modalities, renormalised")
    audio_encoder: Optional[Literal["mel-stats", "clap"]] = Field(None, description="audio embeddings: mel-stats (no model) or clap")
    clap_model: str = Field("laion/clap-htsat-unfused", description="CLAP hub id or local folder (--audio-encoder clap)")
    # index
    index: bool = Field(True, description="build a FAISS index per embedded modality at finalize")
    index_memory_gb: float = Field(4.0, gt=0, description="GiB each index may take (file and search RAM); the type with the best "
                                   "estimated recall that fits is chosen")
    index_recall_target: float = Field(0.95, gt=0, le=1, description="recall@10 the index search parameters are tuned to")
    index_key: Optional[str] = Field(None, description="force a faiss factory string (IVF1024,Flat; OPQ16,IVF256,PQ16; "
                                     "HNSW32); default: chosen from the corpus size and index_memory_gb")
    index_distributed: Literal["auto", "on", "off"] = Field(
        "auto", description="add embeddings to the index on the engine, in parallel (auto: for IVF indexes on dask/beam)")

    # curation run after the build (mmdata curate, docs/curate.md); it writes another folder, so it
    # is not part of what this build writes (a runtime field, out of the config hash)
    curate: Optional[dict[str, Any]] = Field(
        None, description="run mmdata curate after the build: a mapping of its options with out: the curated folder, "
                          "or the path of a YAML file holding one")

    @field_validator("curate", mode="before")
    @classmethod
    def _load_curate(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = read_yaml(value, "curate config")
        if isinstance(value, dict) and isinstance(value.get("curate"), dict):
            value = value["curate"]
        return value

    # downloads: http(s) sources are fetched inside the unit, concurrently and politely (mmdata/sources/http.py)
    download_threads: int = Field(32, ge=1, le=1024, description="download threads per worker process (http/https sources)")
    max_download_bytes: int = Field(32 * 2**20, ge=1, description="a download bigger than this (bytes) fails as too_large")
    connect_timeout: float = Field(10.0, gt=0, le=600, description="seconds to connect to a server")
    read_timeout: float = Field(20.0, gt=0, le=3600, description="seconds without a byte (first byte included) before a download times out")
    download_timeout: float = Field(120.0, gt=0, le=86400, description="seconds a whole download may take (a slow body times out)")
    download_retries: int = Field(2, ge=0, le=20, description="retries of a transient failure (timeout, connect, dns, 429, 5xx), "
                                  "with exponential backoff and jitter")
    retry_after_max: float = Field(60.0, ge=0, le=3600, description="longest Retry-After (seconds) honoured on a 429/503; "
                                   "a longer one fails the sample, for --retry-failed")
    max_redirects: int = Field(5, ge=0, le=30, description="redirect hops followed (each checked like the first)")
    user_agent: str = Field("mmdata/0.1", min_length=1, description="User-Agent of downloads; its first word is the robots token")
    contact_url: Optional[str] = Field(None, description="URL or e-mail added to the User-Agent (+URL) so site owners can reach you")
    per_domain_connections: int = Field(8, ge=1, le=1024, description="requests in flight to one domain, per worker process")
    per_domain_rps: Optional[float] = Field(None, gt=0, description="requests per second to one domain from this machine "
                                            "(its worker processes share it); default: no limit")
    allow_private_addresses: bool = Field(False, description="fetch URLs whose host resolves to a loopback, link-local or private "
                                          "address (else failed blocked:address)")
    optout_directives: list[str] = Field(default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"],
                                         description="X-Robots-Tag directives that filter a download as optout:<directive> "
                                         "(comma-separated; an empty value honours none)")
    respect_robots_txt: bool = Field(False, description="also honour robots.txt (fetched once per domain): optout:robots_txt")
    retry_failed: bool = Field(False, description="re-run only the committed units with transient download failures "
                               "(timeout, connect, dns, 429, 5xx), keeping the others byte for byte")

    @field_validator("optout_directives", mode="before")
    @classmethod
    def _split_directives(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            return [d.strip().lower() for v in value for d in str(v).split(",") if d.strip()]
        return value

    @field_validator("require", "embed", mode="before")
    @classmethod
    def _split_require(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @model_validator(mode="after")
    def _check_segments(self) -> "BuildConfig":
        if self.max_segment is not None and self.max_segment < self.min_segment:
            raise ValueError("max_segment must be >= min_segment")
        return self

    @model_validator(mode="before")
    @classmethod
    def _augment_defaults(cls, data: Any) -> Any:
        """Load ``augment`` (a mapping or a YAML path: a bad one is a one-line UserError) and take
        ``views`` and ``augment_seed`` from it when not given, so the hash holds the values used."""
        if not isinstance(data, dict) or data.get("augment") is None:
            return data
        aug = load_augment_config(data["augment"])
        return {**data, "augment": aug, "views": aug.views if data.get("views") is None else data["views"],
                "augment_seed": aug.seed if data.get("augment_seed") is None else data["augment_seed"]}

    @field_validator("jpeg_codec")
    @classmethod
    def _resolve_codec(cls, value: str) -> str:
        """``auto`` resolves here, on the machine that plans the build: the hash names the codec used."""
        return _resolve_fast(value, "simplejpeg", "jpeg_codec", "simplejpeg", "simplejpeg")

    @field_validator("resize_backend")
    @classmethod
    def _resolve_resize(cls, value: str) -> str:
        """``auto`` resolves here, like ``jpeg_codec``: the hash names the resize library used."""
        return _resolve_fast(value, "cv2", "resize_backend", "opencv", "opencv-python-headless")

    @model_validator(mode="after")
    def _check_views(self) -> "BuildConfig":
        if self.views and self.augment is None:
            raise ValueError("views need an augment config (--augment CONFIG.yaml)")
        if not self.keep_originals and not self.views:
            raise ValueError("dropping the originals (keep_originals: false) needs views >= 1")
        return self

    @property
    def n_views(self) -> int:
        """Augmented views written per sample (0 without an augment config)."""
        return (self.views or 0) if self.augment is not None else 0

    def content_dict(self) -> dict:
        """The fields that determine the output bytes. Without an augment config the augmentation
        fields change nothing, and stay out (builds made before they existed keep their hash)."""
        skip = RUNTIME_FIELDS | (AUGMENT_FIELDS if self.augment is None else frozenset())
        if self.audio_col is None:  # builds made before the option existed keep their hash
            skip = skip | {"audio_col"}
        if self.jpeg_codec == "pillow":  # the codec before the option existed: those builds keep their hash
            skip = skip | {"jpeg_codec"}
        if self.resize_backend == "pillow":  # likewise the resize library
            skip = skip | {"resize_backend"}
        skip |= {k for k in DOWNLOAD_CONTENT_FIELDS
                 if getattr(self, k) == type(self).model_fields[k].get_default(call_default_factory=True)}
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in skip}

    @property
    def config_hash(self) -> str:
        blob = json.dumps(self.content_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def embedded_modalities(self) -> list[str]:
        """Modalities written to embeddings/<modality>/ (``fused`` included when asked, ``audio``
        with an audio encoder, which needs no open_clip model)."""
        mods = []
        if self.model:
            mods = sorted(self.embed) + (["fused"] if self.fused and len(self.embed) > 1 else [])
        return mods + (["audio"] if self.audio_encoder else [])

    @property
    def n_workers(self) -> int:
        return self.workers or os.cpu_count() or 1


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        parts.append(f"{field}: {e['msg']}")
    return "; ".join(parts)


_AUDIO_KEYS = frozenset(AudioConfig.model_fields) - frozenset(BuildConfig.model_fields)


def _nest_audio(values: dict[str, Any], new: dict[str, Any]) -> None:
    """Merge ``new`` over ``values``; flat AudioConfig keys (``sample_rate`` from a flag or a flat
    YAML) move into the ``audio`` mapping, over what it already holds."""
    values.update(new)
    nested = values.get("audio")
    if isinstance(nested, BaseModel):
        nested = nested.model_dump()
    flat = {k: values.pop(k) for k in list(values) if k in _AUDIO_KEYS}
    if isinstance(nested, dict):
        values["audio"] = {**{str(k).replace("-", "_"): v for k, v in nested.items()}, **flat}
    elif nested is None and flat:
        values["audio"] = flat
    # else: ``audio`` is not a mapping, and pydantic names the field


def read_yaml(path: str, what: str = "config") -> Any:
    """The YAML document at ``path`` (an empty file reads as ``{}``); a missing file or bad YAML is one UserError line."""
    import yaml  # here: a worker process, which gets its config pickled, need not import it

    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh) or {}
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}") from None


def load_config(path: Optional[str] = None, **overrides: Any) -> BuildConfig:
    """Merge defaults < YAML file at ``path`` < ``overrides`` (``None`` values ignored) and validate."""
    values: dict[str, Any] = {}
    if path:
        loaded = read_yaml(path)
        if not isinstance(loaded, dict):
            raise UserError(f"config {path} must be a mapping of field: value")
        values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
        _nest_audio(values, {})
    _nest_audio(values, {k: v for k, v in overrides.items() if v is not None})
    try:
        return BuildConfig(**values)
    except ValidationError as exc:
        raise UserError(f"bad config: {_describe(exc)}") from None


def _resolve_fast(value: str, module: str, field: str, fast: str, package: str) -> str:
    """``pillow`` stays; ``auto`` becomes ``fast`` when ``module`` imports here, else ``pillow``; ``fast``
    itself needs the module (one line naming the package otherwise)."""
    if value == "pillow":
        return value
    try:
        importlib.import_module(module)
    except ImportError:
        if value == "auto":
            return "pillow"
        raise ValueError(f"{field} {fast} needs the package {package} (pip install 'mmdata[fast]')") from None
    return fast
