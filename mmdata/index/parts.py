"""The distributed index build of finalize: train here, add per group of units on the engine, merge here.

For an index that merges (Flat, IVF…), ``build_indexes`` hands the modality to ``DistributedBuild``:

1. here: train the empty index once on a bounded sample of all the units' embeddings
   (``index.train_index``), written to ``OUT/index/parts/<modality>/trained.index``;
2. on the engine: one task per group of consecutive units (``add_part``) reads the trained index and
   the group's embeddings, adds them, and writes ``OUT/index/parts/<modality>/<part>.index``
   atomically; it returns only the part's path and counts (every modality's groups go in one map);
3. here: merge the parts in unit order, tune and measure against exact search, write
   ``index/<modality>.index``, delete ``index/parts/``.

Merging consecutive groups in unit order gives the single-process index byte for byte, however the
units are grouped, so the output does not depend on the engine or the number of workers.
"""
from __future__ import annotations

import os
import posixpath
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

from mmdata.config import BuildConfig
from mmdata.index.ids import unit_source, written_ids
from mmdata.storage import OutputDir


class TaskMapper(Protocol):
    """What the distributed build needs of an engine (``mmdata.engines.base.Engine`` is one): run a
    module-level function over small items where the units run. Declared here so that the index
    layer never imports the engines above it."""

    @property
    def parallelism(self) -> int: ...

    def map_tasks(self, fn: Callable[[Any], Any], items: Sequence[Any], *, name: str) -> list: ...


PARTS = "index/parts"
PARTS_PER_WORKER = 4  # a few tasks per worker, so one slow group does not hold up the merge
ID_BYTES = 8


@dataclass(frozen=True)
class PartTask:
    """One engine task: add units ``units``' ``modality`` embeddings to the trained index at ``trained``
    and write the partial index to ``part`` (both relative to the output folder ``out``)."""

    out: str
    modality: str
    units: tuple[str, ...]
    trained: str
    part: str


def add_part(task: PartTask) -> dict:
    """Run on a worker: build one partial index; return its path and counts (small, JSON-able).

    Idempotent: a retry rewrites the same part (temporary name, fsync, rename; one put on object stores).
    """
    from mmdata.index import add_partial

    out = OutputDir(task.out)
    with tempfile.TemporaryDirectory(prefix="mmdata-part-") as scratch:
        sources = []
        for name in task.units:
            source = unit_source(out, task.modality, name, written_ids(out, name), scratch)
            if source is not None:
                sources.append(source)
        trained = out.path(task.trained) if out.local else _fetch(out, task.trained, scratch)
        target = out.path(task.part) if out.local else os.path.join(scratch, "part.index")
        info = add_partial(trained, sources, target)
        size = os.path.getsize(target)
        if not out.local:
            out.makedirs(posixpath.dirname(task.part))
            out.fs.put_file(target, out.path(task.part))
    return {"part": task.part, "n": info["n"], "add_seconds": info["add_seconds"], "size_bytes": size}


def _fetch(out: OutputDir, rel: str, folder: str) -> str:
    path = os.path.join(folder, rel.replace("/", "_"))
    out.fs.get_file(out.path(rel), path)
    return path


def group_units(counts: Sequence[int], n_parts: int) -> list[list[int]]:
    """Cut positions ``0..len(counts)-1`` into at most ``n_parts`` consecutive groups of about equal vector counts."""
    total, groups, acc = sum(counts), [[]], 0
    for i, count in enumerate(counts):
        if groups[-1] and len(groups) < n_parts and acc >= total * len(groups) / n_parts:
            groups.append([])
        groups[-1].append(i)
        acc += count
    return groups


def part_count(n_units: int, parallelism: int, n_vectors: int, vector_bytes: int, trained_bytes: int) -> int:
    """Parts for one index: a few per worker, at most one per unit, and few enough that the copies of
    the trained index (every part carries one) weigh no more than the vectors themselves."""
    by_weight = n_vectors * vector_bytes // max(1, trained_bytes)
    return max(1, min(n_units, PARTS_PER_WORKER * max(1, parallelism), by_weight))


@dataclass
class _Pending:
    modality: str
    sources: list
    train_infos: dict
    trained_local: str
    tasks: list[PartTask]


class DistributedBuild:
    """The distributed builds of one finalize: ``train`` each modality here, then ``run`` adds every
    modality's parts in one engine map (one Beam pipeline, one batch of Dask tasks) and merges."""

    def __init__(self, config: BuildConfig, out: OutputDir, root: str, engine: Optional["TaskMapper"]):
        self.config, self.out, self.root, self.engine = config, out, root, engine
        self.url = out.root if out.local else out.url  # absolute: workers may run elsewhere
        self.pending: list[_Pending] = []

    def train(self, modality: str, index_key: str, names: list[str], sources: list, choice: dict | None = None) -> None:
        from mmdata.index import train_index
        from mmdata.index.backend import import_faiss

        if not self.pending:  # parts of an interrupted earlier run
            self.out.remove(PARTS)
        trained = f"{PARTS}/{modality}/trained.index"
        trained_local = os.path.join(self.root, trained)
        train_infos = train_index(sources, trained_local, index_key=index_key, memory_gb=self.config.index_memory_gb,
                                  choice=choice)
        if not self.out.local:
            self.out.makedirs(posixpath.dirname(trained))
            self.out.fs.put_file(trained_local, self.out.path(trained))
        faiss = import_faiss()
        ivf = faiss.try_extract_index_ivf(faiss.read_index(trained_local))
        vector_bytes = (ivf.code_size if ivf is not None else 4 * train_infos["dim"]) + ID_BYTES
        n_parts = part_count(len(sources), self.engine.parallelism if self.engine else 1, train_infos["n"],
                             vector_bytes, os.path.getsize(trained_local))
        groups = group_units([len(s.ids) for s in sources], n_parts)
        tasks = [PartTask(self.url, modality, tuple(names[i] for i in group), trained, f"{PARTS}/{modality}/{j:05d}.index")
                 for j, group in enumerate(groups)]
        self.pending.append(_Pending(modality, sources, train_infos, trained_local, tasks))

    def run(self) -> dict[str, dict]:
        """Add all parts on the engine, merge and tune each index here; the infos by modality."""
        from mmdata.index import finalize_index, merge_partials

        if not self.pending:
            return {}
        tasks = [t for p in self.pending for t in p.tasks]
        results = self._map(add_part, tasks)
        infos, done = {}, 0
        with tempfile.TemporaryDirectory(prefix="mmdata-parts-") as scratch:
            for p in self.pending:
                mine, done = results[done:done + len(p.tasks)], done + len(p.tasks)
                assert [r["part"] for r in mine] == [t.part for t in p.tasks], "results out of task order"
                parts = [self.out.path(t.part) if self.out.local else _fetch(self.out, t.part, scratch) for t in p.tasks]
                index_path = os.path.join(self.root, "index", f"{p.modality}.index")
                merged = merge_partials(p.trained_local, parts, index_path)
                if not self.out.local:  # fetched copies: the merged index holds their vectors now
                    for path in parts:
                        os.unlink(path)
                infos[p.modality] = finalize_index(index_path, p.sources, train_infos=p.train_infos, partial_infos=mine,
                                                   merge_infos=merged, recall_target=self.config.index_recall_target)
                infos[p.modality]["n_partials"] = merged["n_partials"]
                if not self.out.local:
                    self.out.fs.put_file(index_path, self.out.path(f"index/{p.modality}.index"))
        self.out.remove(PARTS)
        return infos

    def _map(self, fn: Callable[[Any], Any], tasks: list) -> list:
        if self.engine is None:
            return [fn(t) for t in tasks]
        return self.engine.map_tasks(fn, tasks, name="index-parts")
