"""Training-side reading of a build: ``make_loader(OUT, …)`` streams the shards as batches of
decoded images, token ids, audio, stored embeddings, metadata and (optionally) FAISS neighbours.

Layers: ``plan`` (which shards each rank and worker reads per epoch), ``store`` (per-shard rows and
stored embeddings), ``decode`` (one sample), ``collate`` (a batch), ``neighbours`` (batched index
lookups), ``dataset`` (the per-worker pipeline), ``loader`` (the DataLoader and its length).
"""
from mmdata.loader.collate import collate
from mmdata.loader.decode import LoaderDecodeError, fit_length
from mmdata.loader.loader import Loader, default_transform, make_loader, model_transform
from mmdata.loader.neighbours import NeighbourLookup
from mmdata.loader.plan import EpochPlan, Shard, mix_seed, read_shards

__all__ = ["make_loader", "Loader", "NeighbourLookup", "EpochPlan", "Shard", "read_shards", "collate",
           "fit_length", "mix_seed", "model_transform", "default_transform", "LoaderDecodeError"]
