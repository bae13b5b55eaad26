"""The index step of finalize: ``index/ids.parquet`` and one FAISS index per embedded modality.

Index ids are the samples' 64-bit ids. Samples that lack a modality have a zero row in that
modality's embedding file; they are left out of its index. Each index is built in this process, or
(``index_distributed``, see ``index_parts.py``) trained here and filled by the engine's workers.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Iterator, Optional

from mmdata.config import BuildConfig
from mmdata.errors import UserError
from mmdata.index.ids import unit_source, write_ids
from mmdata.index.parts import DistributedBuild, TaskMapper
from mmdata.records import Unit
from mmdata.storage import OutputDir

NOT_MERGEABLE = ("index_distributed 'on' needs an index that merges (Flat or IVF…); {key!r} does not: "
                 "use index_distributed 'off' or 'auto'")


def check_index_options(config: BuildConfig) -> None:
    """Fail before a build starts on a forced ``index_key`` faiss cannot parse, or one that
    ``index_distributed: on`` cannot merge. One UserError line."""
    from mmdata.index import check_index_key, is_mergeable

    if not (config.index and config.index_key and config.embedded_modalities):
        return
    try:
        check_index_key(config.index_key)
    except ValueError as exc:
        raise UserError(f"bad index_key {config.index_key!r}: {exc}") from None
    if config.index_distributed == "on" and not is_mergeable(config.index_key):
        raise UserError(NOT_MERGEABLE.format(key=config.index_key))


def distribute(config: BuildConfig, index_key: str, n_units: int, on_engine: bool) -> bool:
    """Whether to build this index on the engine (train here, add per group of units there, merge here).

    ``auto``: for mergeable IVF indexes when the units ran on a cluster engine (Dask, Beam); ``on``: for any
    mergeable index (Flat, IVF), on whatever engine; never for a single unit.
    """
    from mmdata.index import is_ivf, is_mergeable

    mode = config.index_distributed
    if mode == "on" and not is_mergeable(index_key):
        raise UserError(NOT_MERGEABLE.format(key=index_key))
    if mode == "off" or n_units < 2:
        return False
    return mode == "on" or (on_engine and config.engine != "local" and is_ivf(index_key) and is_mergeable(index_key))


@contextlib.contextmanager
def local_dir(out: OutputDir) -> Iterator[str]:
    """The output folder as a local path (a staging folder for remote outputs)."""
    if out.local:
        yield out.root
        return
    with tempfile.TemporaryDirectory(prefix="mmdata-index-") as tmp:
        yield tmp


def build_indexes(config: BuildConfig, out: OutputDir, units: list[Unit], engine: Optional["TaskMapper"] = None) -> dict:
    """Write ids.parquet, the indexes and index_infos.json; return the infos by modality.

    ``engine`` (the build's, still open) runs the distributed builds; without one they run here.
    """
    from mmdata.index import build_index, check_index_key, choose_for_corpus, faiss_reason, is_mergeable
    from mmdata.index.sources import validate_sources

    ids_by_unit = write_ids(out, units)
    infos: dict[str, dict] = {}
    with local_dir(out) as root, tempfile.TemporaryDirectory(prefix="mmdata-emb-") as scratch:
        os.makedirs(os.path.join(root, "index"), exist_ok=True)
        distributed = DistributedBuild(config, out, root, engine)
        for modality in config.embedded_modalities:
            names, sources = [], []
            for unit in units:
                source = unit_source(out, modality, unit.name, ids_by_unit[unit.name], scratch)
                if source is not None:
                    names.append(unit.name)
                    sources.append(source)
            if not sources:
                continue
            corpus = validate_sources(sources, check_unique_ids=False)  # the index build checks them
            key, choice = config.index_key, None
            if not key:  # by recall estimated on the training sample, among the types that fit the budget
                key, choice = choose_for_corpus(corpus, config.index_memory_gb,
                                                mergeable_only=config.index_distributed == "on")
            try:
                if config.index_key:
                    check_index_key(key, corpus.dim)
                if distribute(config, key, len(sources), engine is not None):
                    distributed.train(modality, key, names, sources, choice=choice)
                    continue
                index_path = os.path.join(root, "index", f"{modality}.index")
                infos[modality] = build_index(sources, index_path, index_key=key, memory_gb=config.index_memory_gb,
                                              recall_target=config.index_recall_target, choice=choice)
                if engine is not None and config.engine != "local" and not is_mergeable(key):
                    infos[modality]["built_in_one_place"] = f"{key} cannot be merged from partial builds"
            except (ValueError, RuntimeError) as exc:
                if not config.index_key:  # a chosen key always builds: anything else is a bug
                    raise
                raise UserError(f"index_key {key!r} does not fit the {modality} embeddings ({corpus.n} vectors "
                                f"of dim {corpus.dim}): {faiss_reason(exc)}") from None
            if not out.local:
                out.fs.put_file(index_path, out.path(f"index/{modality}.index"))
        infos.update(distributed.run())
    infos = {m: infos[m] for m in config.embedded_modalities if m in infos}
    out.write_bytes("index/index_infos.json", json.dumps(infos, indent=1, sort_keys=True, default=str).encode())
    return infos
