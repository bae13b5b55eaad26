"""Which shards each (rank, worker) reads in an epoch, and how many samples and batches that makes.

The shard order of an epoch is a permutation drawn from ``(seed, epoch)``, the same on every rank.
Shards are dealt node first, then worker, as webdataset's ``split_by_node``/``split_by_worker``
do: rank ``r`` takes ``order[r::world_size]`` and its worker ``w`` takes ``[w::num_workers]`` of
those. Every shard is read by exactly one (rank, worker) per epoch. When the number of shards is
not a multiple of ``world_size * num_workers`` some readers get one shard more than others (and
some none, when there are fewer shards than readers); shards also differ in size, so ranks can
see different sample counts — ``mode="exact"`` reports that honestly in ``len()``,
``mode="even"`` pads every reader to the same number of full batches with flagged repeats.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import struct
from dataclasses import dataclass
from typing import Literal, Optional

from mmdata.errors import UserError
from mmdata.storage import OutputDir

Mode = Literal["exact", "even", "resampled"]
MODES = ("exact", "even", "resampled")


def mix_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (never Python's salted ``hash``)."""
    digest = hashlib.blake2b(json.dumps([str(p) for p in parts]).encode(), digest_size=8).digest()
    return struct.unpack("<Q", digest)[0] >> 1


@dataclass(frozen=True)
class Shard:
    name: str  # "00000" (the tar is shards/00000.tar)
    size: int  # written samples, from sizes.json


def read_shards(out: OutputDir) -> list[Shard]:
    """The non-empty shards of a build, in name order, with their sizes from ``shards/sizes.json``."""
    if not out.exists("shards/sizes.json"):
        raise UserError(f"{out.url} has no shards/sizes.json: not a finished mmdata build")
    sizes = json.loads(out.read_bytes("shards/sizes.json"))
    shards = [Shard(tar[:-4], int(n)) for tar, n in sorted(sizes.items()) if tar.endswith(".tar") and int(n) > 0]
    if not shards:
        raise UserError(f"{out.url} has no samples (every shard in sizes.json is empty)")
    return shards


@dataclass(frozen=True)
class EpochPlan:
    """The shard assignment of one epoch for ``world_size`` ranks of ``num_workers`` readers each."""

    shards: tuple[Shard, ...]
    epoch: int
    seed: int
    world_size: int
    num_workers: int  # readers per rank (a DataLoader with 0 workers reads in one)
    shuffle: bool = True

    @functools.cached_property
    def order(self) -> list[int]:
        idx = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(mix_seed("shards", self.seed, self.epoch)).shuffle(idx)
        return idx

    def reader_shards(self, rank: int, worker: int) -> list[Shard]:
        """The shards reader ``worker`` of ``rank`` reads, in reading order."""
        return [self.shards[i] for i in self.order[rank::self.world_size][worker::self.num_workers]]

    def reader_samples(self, rank: int, worker: int) -> int:
        return sum(s.size for s in self.reader_shards(rank, worker))

    @property
    def total_samples(self) -> int:
        return sum(s.size for s in self.shards)

    def reader_batches(self, rank: int, worker: int, batch_size: int, mode: Mode, drop_last: bool = False,
                       samples_per_epoch: Optional[int] = None) -> int:
        """Batches reader (rank, worker) yields this epoch."""
        if mode == "exact":
            n = self.reader_samples(rank, worker)
            return n // batch_size if drop_last else math.ceil(n / batch_size)
        if mode == "even":  # everyone pads to the busiest reader's batch count
            return max(math.ceil(self.reader_samples(r, w) / batch_size)
                       for r in range(self.world_size) for w in range(self.num_workers))
        if mode == "resampled":
            n = samples_per_epoch or self.total_samples
            return math.ceil(n / (self.world_size * self.num_workers * batch_size))
        raise ValueError(f"unknown mode {mode!r}")

    def batches(self, rank: int, batch_size: int, mode: Mode, drop_last: bool = False,
                samples_per_epoch: Optional[int] = None) -> int:
        """Batches rank ``rank`` yields this epoch (what ``len(loader)`` says)."""
        return sum(self.reader_batches(rank, w, batch_size, mode, drop_last, samples_per_epoch)
                   for w in range(self.num_workers))

    def samples(self, rank: int, batch_size: int, mode: Mode, drop_last: bool = False,
                samples_per_epoch: Optional[int] = None) -> int:
        """Samples rank ``rank`` yields this epoch (repeats included in the even and resampled modes)."""
        if mode == "exact":
            return sum(min(self.reader_samples(rank, w),
                           self.reader_batches(rank, w, batch_size, mode, drop_last) * batch_size)
                       for w in range(self.num_workers))
        return self.batches(rank, batch_size, mode, drop_last, samples_per_epoch) * batch_size

    def padding_shards(self, rank: int, worker: int) -> list[Shard]:
        """Where an "even" reader takes its repeats from: the epoch's shards, starting after its own."""
        order = self.order
        start = (rank + worker * self.world_size) % len(order)
        return [self.shards[i] for i in order[start:] + order[:start]]


def resolve_rank(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    """(rank, world_size): explicit arguments, else torch.distributed when initialised, else (0, 1)."""
    if rank is None and world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise UserError("pass both rank= and world_size=, or neither (torch.distributed is then used)")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
    return rank, world_size
