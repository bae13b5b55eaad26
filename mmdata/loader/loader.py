"""``make_loader(OUT, …)``: a PyTorch DataLoader over a build's shards, ready for a training loop.

    loader = make_loader("OUT", modalities=["image", "text"], batch_size=256, num_workers=8)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:          # len(loader) batches, from shards/sizes.json
            ...

Batches are built inside the workers (``batch_size=None`` on the DataLoader, as open_clip does), so
the neighbour lookup searches a whole batch at once.
"""
from __future__ import annotations

import json
import multiprocessing
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from torch.utils.data import DataLoader

from mmdata.embed_switch import pending_switch
from mmdata.errors import UserError
from mmdata.loader.dataset import ShardStream, StreamSpec
from mmdata.loader.decode import MODALITIES, Augment, Crop, DecodeSpec, SampleDecoder, augment_hooks
from mmdata.loader.neighbours import NeighbourLookup
from mmdata.loader.plan import MODES, EpochPlan, Mode, read_shards, resolve_rank
from mmdata.loader.store import EmbeddingStore, embedded_modalities
from mmdata.storage import OutputDir


def _manifest(out: OutputDir) -> dict:
    return json.loads(out.read_bytes("manifest.json")) if out.exists("manifest.json") else {}


def _encoder_facts(out: OutputDir) -> dict:
    return (_manifest(out).get("embeddings") or {}).get("encoder") or {}


def model_transform(model: str, pretrained: Optional[str] = None, image_size: Optional[int] = None) -> Callable:
    """The eval preprocessing of an open_clip model (size, mean, std, resize mode), without loading weights."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    import mmdata.encoders.loading  # noqa: F401  (registers mmdata's own model configs)

    cfg = open_clip.get_model_config(model.replace("/", "-"))
    if cfg is None:
        raise UserError(f"no open_clip config for {model!r}: pass transform= to the loader")
    base = {"size": cfg.get("vision_cfg", {}).get("image_size", 224), **cfg.get("preprocess_cfg", {})}
    tag = open_clip.get_pretrained_cfg(model.replace("/", "-"), pretrained) if pretrained else {}
    pp = merge_preprocess_dict(base, tag or {})
    if image_size:
        pp["size"] = image_size
    return image_transform_v2(PreprocessCfg(**pp), is_train=False)


def default_transform(out: OutputDir, image_size: Optional[int]) -> Callable:
    """The build model's eval preprocessing; open_clip's ViT-B-32 one when the build has no model."""
    facts = _encoder_facts(out)
    if facts.get("model"):
        return model_transform(facts["model"], facts.get("pretrained"), image_size)
    return model_transform("ViT-B-32", None, image_size)


def default_tokenizer(out: OutputDir, augmented_text: bool = False) -> Optional[Callable]:
    """The tokenizer of the build's stored ``tokens.npy`` when captions are augmented (their tokens
    are then recomputed), None when the stored tokens serve as they are, else the build model's
    tokenizer (None without a model: batches then carry the captions only)."""
    manifest = _manifest(out)
    config = manifest.get("config") or {}
    model = ((manifest.get("embeddings") or {}).get("encoder") or {}).get("model")
    if config.get("tokenize"):
        name = config.get("tokenizer") if augmented_text else None
    else:
        name = model
    if not name:
        return None
    import open_clip

    import mmdata.encoders.loading  # noqa: F401

    return open_clip.get_tokenizer(name)


class Loader:
    """Iterable of batch dicts; ``len()`` is this rank's batch count for the current epoch."""

    def __init__(self, dataset: ShardStream, dataloader: DataLoader, epoch_value):
        self.dataset = dataset
        self.dataloader = dataloader
        self._epoch = epoch_value

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next ``iter()`` reads (shard order, shuffle, augmentation seeds)."""
        self._epoch.value = int(epoch)

    @property
    def plan(self) -> EpochPlan:
        return self.dataset.plan(self.epoch)

    def _count(self, what: str) -> int:
        s = self.dataset.spec
        return getattr(self.plan, what)(s.rank, s.batch_size, s.mode, s.drop_last, s.samples_per_epoch)

    def __len__(self) -> int:
        return self._count("batches")

    @property
    def num_samples(self) -> int:
        """Samples this rank yields this epoch (repeats included in the even and resampled modes)."""
        return self._count("samples")

    def __iter__(self) -> Iterator[dict]:
        return iter(self.dataloader)


def make_loader(
    out: str,
    modalities: Sequence[str] = ("image", "text"),
    batch_size: int = 64,
    shuffle_buffer: int = 1000,
    num_workers: int = 2,
    epoch: int = 0,
    seed: int = 0,
    *,
    embeddings: Union[bool, Sequence[str]] = True,
    neighbours: int = 0,
    neighbour_modality: str = "image",
    neighbour_embeddings: Optional[Sequence[str]] = None,
    transform: Optional[Callable] = None,
    image_size: Optional[int] = None,
    tokenizer: Union[str, Callable, None] = "auto",
    augment: Union[Augment, Any, None] = None,
    audio_seconds: float = 10.0,
    sample_rate: Optional[int] = None,
    mel_frames: int = 1000,
    crop: Crop = "start",
    mode: Mode = "exact",
    samples_per_epoch: Optional[int] = None,
    drop_last: bool = False,
    shuffle_shards: bool = True,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    persistent_workers: bool = True,
    prefetch_factor: Optional[int] = 2,
    pin_memory: bool = False,
) -> Loader:
    """A loader over the build in ``out``; see README "Training" for every field of a batch.

    ``modalities``: decoded fields, from ``image`` (tensor after ``transform``), ``text`` (captions and
    token ids), ``audio`` (waveform, ``audio_seconds`` long, with ``audio_mask``), ``mel`` (stored
    log-mel, ``mel_frames`` long, with ``mel_mask``). ``embeddings``: stored embedding modalities to
    join (True: all). ``neighbours=k``: the k nearest neighbours of each sample in the
    ``neighbour_modality`` index, with their ``neighbour_embeddings`` rows. ``mode``: ``exact`` (every
    sample once per epoch across ranks and workers), ``even`` (the same, plus flagged repeats so every
    reader yields the same number of full batches), ``resampled`` (shards drawn with replacement,
    ``samples_per_epoch`` per epoch). ``rank``/``world_size``: default from torch.distributed.
    ``augment``: an image hook ``fn(image, key, view, seed)``, or an ``mmdata.augment.Augmenter`` (or
    its config: a YAML path, mapping or AugmentConfig) for every modality it has ops for; hooks get
    a seed drawn from ``(seed, epoch)`` and mix in the key and view themselves, as the Augmenter does.
    """
    o = OutputDir(out)
    if pending_switch(o):  # a re-embed committed but not yet switched: never read half old, half new
        raise UserError(f"{out}: an `mmdata embed` switch is committed but unfinished; run `mmdata verify {out}` "
                        "(it finishes the switch) before loading")
    shards = tuple(read_shards(o))
    bad = [m for m in modalities if m not in MODALITIES]
    if bad:
        raise UserError(f"unknown modalities {bad}: choose from {', '.join(MODALITIES)}")
    if mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if batch_size < 1 or num_workers < 0 or shuffle_buffer < 0:
        raise UserError("batch_size must be >= 1, num_workers and shuffle_buffer >= 0")
    if crop not in ("start", "center", "random"):
        raise UserError(f"crop must be start, center or random, got {crop!r}")
    rank, world_size = resolve_rank(rank, world_size)
    lookup = NeighbourLookup(out, neighbours, neighbour_modality, neighbour_embeddings) if neighbours else None
    stored = embedded_modalities(o)
    wanted = list(stored) if embeddings is True else list(embeddings or [])
    if neighbours and neighbour_modality not in wanted:
        wanted.append(neighbour_modality)  # the queries are the samples' own stored embeddings
    missing = [m for m in wanted if m not in stored]
    if missing:
        raise UserError(f"{out} has no stored embeddings for {missing} (stored: {', '.join(stored) or 'none'})")
    if "image" in modalities and transform is None:
        transform = default_transform(o, image_size)
    if augment is not None and not callable(augment) and not callable(getattr(augment, "image", None)):
        from mmdata.augment import Augmenter

        augment = Augmenter(augment)  # a config: AugmentConfig, mapping or YAML path
    if tokenizer == "auto":
        tokenizer = default_tokenizer(o, "text" in augment_hooks(augment)) if "text" in modalities else None
    decoder = SampleDecoder(
        DecodeSpec(modalities=tuple(modalities), transform=transform, tokenizer=tokenizer, augment=augment,
                   audio_seconds=audio_seconds, sample_rate=sample_rate, mel_frames=mel_frames, crop=crop,
                   seed=seed, embeddings=tuple(wanted)),
        {m: EmbeddingStore(o, m) for m in wanted})
    spec = StreamSpec(out=out, shards=shards, batch_size=batch_size, shuffle_buffer=shuffle_buffer,
                      shuffle_shards=shuffle_shards, seed=seed, rank=rank, world_size=world_size,
                      num_workers=max(1, num_workers), mode=mode, drop_last=drop_last,
                      samples_per_epoch=samples_per_epoch)
    epoch_value = multiprocessing.Value("q", int(epoch))
    dataset = ShardStream(spec, decoder, epoch_value, lookup)
    dataloader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                            persistent_workers=persistent_workers and num_workers > 0,
                            prefetch_factor=prefetch_factor if num_workers > 0 else None)
    return Loader(dataset, dataloader, epoch_value)
