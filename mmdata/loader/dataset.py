"""The per-worker pipeline: this reader's shards → raw samples (joined to their row and id) →
seeded shuffle buffer → decode → batches → neighbour lookup.

It is a ``torch.utils.data.IterableDataset``; each DataLoader worker runs ``__iter__`` with its own
slice of the epoch's shards (``plan.EpochPlan``). Tars are read with webdataset's tar iterators
through fsspec, so any output URL mmdata writes to can be streamed.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Iterator, Optional

from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from mmdata.loader.collate import collate
from mmdata.loader.decode import LoaderDecodeError, SampleDecoder
from mmdata.loader.neighbours import NeighbourLookup
from mmdata.loader.plan import EpochPlan, Mode, Shard, mix_seed
from mmdata.loader.store import shard_rows
from mmdata.storage import OutputDir


@dataclass
class StreamSpec:
    out: str
    shards: tuple[Shard, ...]
    batch_size: int
    shuffle_buffer: int
    shuffle_shards: bool
    seed: int
    rank: int
    world_size: int
    num_workers: int
    mode: Mode
    drop_last: bool
    samples_per_epoch: Optional[int]


def shuffled(items: Iterator[dict], bufsize: int, rng: random.Random) -> Iterator[dict]:
    """A shuffle buffer: fill to ``bufsize``, then emit a random element for each one read."""
    if bufsize <= 1:
        yield from items
        return
    buf: list[dict] = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = rng.randrange(bufsize)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


class ShardStream(IterableDataset):
    """Batches of one (rank, worker) for the epoch held in ``epoch`` (a shared value)."""

    def __init__(self, spec: StreamSpec, decoder: SampleDecoder, epoch, neighbours: Optional[NeighbourLookup] = None):
        super().__init__()
        self.spec = spec
        self.decoder = decoder
        self.epoch = epoch  # multiprocessing.Value: set_epoch reaches persistent workers too
        self.neighbours = neighbours
        self._out: Optional[OutputDir] = None

    @property
    def out(self) -> OutputDir:
        if self._out is None:
            self._out = OutputDir(self.spec.out)
        return self._out

    def plan(self, epoch: int) -> EpochPlan:
        s = self.spec
        return EpochPlan(s.shards, epoch, s.seed, s.world_size, s.num_workers, s.shuffle_shards)

    def read_shard(self, shard: Shard, repeat: bool = False) -> Iterator[dict]:
        """Raw samples of one shard in written order, with ``__shard__``, ``__row__``, ``__id__``."""
        rows = shard_rows(self.out, shard.name)
        url = self.out.path(f"shards/{shard.name}.tar")
        with self.out.fs.open(url, "rb") as stream:
            for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
                key = sample["__key__"]
                if key not in rows:
                    raise LoaderDecodeError(f"{key} in shards/{shard.name}.tar is not a written row of shards/{shard.name}"
                                            f".parquet: the build is inconsistent (run mmdata verify)")
                sample["__shard__"], (sample["__row__"], sample["__id__"]) = shard.name, rows[key]
                if repeat:
                    sample["__repeat__"] = True
                yield sample

    def raw_samples(self, epoch: int, worker: int) -> Iterator[dict]:
        s = self.spec
        plan = self.plan(epoch)
        if s.mode == "resampled":
            rng = random.Random(mix_seed("resample", s.seed, epoch, s.rank, worker))
            wanted = plan.reader_batches(s.rank, worker, s.batch_size, s.mode, samples_per_epoch=s.samples_per_epoch) * s.batch_size
            endless = (x for _ in itertools.count() for x in self.read_shard(rng.choice(s.shards)))
            yield from itertools.islice(endless, wanted)
            return
        own = (x for shard in plan.reader_shards(s.rank, worker) for x in self.read_shard(shard))
        if s.mode == "exact":
            yield from own
            return
        wanted = plan.reader_batches(s.rank, worker, s.batch_size, s.mode) * s.batch_size
        padding = (x for _ in itertools.count() for shard in plan.padding_shards(s.rank, worker)
                   for x in self.read_shard(shard, repeat=True))
        yield from itertools.islice(itertools.chain(own, padding), wanted)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch = int(self.epoch.value)
        s = self.spec
        if (info.num_workers if info is not None else 1) != s.num_workers:  # the plan deals shards to s.num_workers
            raise RuntimeError(f"this stream was planned for {s.num_workers} workers per rank, it runs in "
                               f"{info.num_workers if info else 0}: use the DataLoader make_loader returns")
        rng = random.Random(mix_seed("samples", s.seed, epoch, s.rank, worker))
        raw = shuffled(self.raw_samples(epoch, worker), s.shuffle_buffer, rng)
        decoded = (self.decoder(x, epoch) for x in raw)
        while True:
            chunk = list(itertools.islice(decoded, s.batch_size))
            if not chunk or (s.drop_last and len(chunk) < s.batch_size):
                return
            batch = collate(chunk)
            if self.neighbours is not None:
                batch = self.neighbours(batch)
            yield batch

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_out": None}

