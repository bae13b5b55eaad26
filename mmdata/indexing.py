"""The index step of finalize: ``index/ids.parquet`` and one FAISS index per embedded modality.

Index ids are the samples' 64-bit ids. Samples that lack a modality have a zero row in that
modality's embedding file; they are left out of its index. Each index is built in this process, or
(``index_distributed``, see ``index_parts.py``) trained here and filled by the engine's workers.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmdata.config import BuildConfig
from mmdata.errors import UserError
from mmdata.records import Unit
from mmdata.storage import OutputDir
from mmdata.unit import embedding_file, shard_files

if TYPE_CHECKING:
    from mmdata.engines.base import Engine

IDS_SCHEMA = pa.schema([
    pa.field("id", pa.int64(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("row", pa.int32(), nullable=False),
    pa.field("caption", pa.string()),
])


ROW_GROUP_ROWS = 1 << 17  # rows per row group of ids.parquet: what its writer holds at most, beyond one shard


def _written(out: OutputDir, name: str, columns: list[str]) -> pa.Table:
    """``columns`` of unit ``name``'s written samples, in row order."""
    table = pq.read_table(io.BytesIO(out.read_bytes(shard_files(name)["parquet"])), columns=[*columns, "status"])
    return table.filter(pc.equal(table.column("status"), "written")).select(columns)


def written_table(out: OutputDir, name: str) -> pa.Table:
    """Unit ``name``'s rows of ids.parquet (``IDS_SCHEMA``): id, key, shard, row, caption of its
    written samples, in row order."""
    table = _written(out, name, ["id", "key", "row", "caption"])
    columns = {"id": table.column("id"), "key": table.column("key"), "shard": pa.repeat(f"{name}.tar", table.num_rows),
               "row": table.column("row"), "caption": table.column("caption")}
    return pa.table({f.name: columns[f.name].cast(f.type) for f in IDS_SCHEMA}, schema=IDS_SCHEMA)


def write_ids(out: OutputDir, units: list[Unit]) -> dict[str, np.ndarray]:
    """Write ``index/ids.parquet`` (the written samples, in shard then row order) one shard at a time;
    return each unit's written ids, in row order (the rows of its embedding files).

    Row groups hold ``ROW_GROUP_ROWS`` rows (the last one the rest), so the bytes depend only on the
    rows, not on how they were read: the same shards give the same file on every engine.
    """
    ids: dict[str, np.ndarray] = {}
    with out.atomic_open("index/ids.parquet") as fh, pq.ParquetWriter(fh, IDS_SCHEMA, compression="zstd") as writer:
        pending: list[pa.Table] = []
        n_pending, n_written = 0, 0
        for unit in units:
            table = written_table(out, unit.name)
            ids[unit.name] = np.asarray(table.column("id").to_numpy(), dtype=np.int64)
            pending.append(table)
            n_pending += table.num_rows
            while n_pending >= ROW_GROUP_ROWS:
                buffered = pa.concat_tables(pending)
                writer.write_table(buffered.slice(0, ROW_GROUP_ROWS).combine_chunks())
                rest = buffered.slice(ROW_GROUP_ROWS)
                pending, n_pending, n_written = [rest], rest.num_rows, n_written + ROW_GROUP_ROWS
        if n_pending or not n_written:  # the rest; an empty corpus still gets one (empty) row group
            writer.write_table(pa.concat_tables(pending).combine_chunks() if pending else IDS_SCHEMA.empty_table())
    return ids


def written_ids(out: OutputDir, name: str) -> np.ndarray:
    """The ids of unit ``name``'s written samples, in row order (the rows of its embedding files)."""
    return np.asarray(_written(out, name, ["id"]).column("id").to_numpy(), dtype=np.int64)


def unit_source(out: OutputDir, modality: str, name: str, ids: np.ndarray, scratch: str):
    """Unit ``name``'s ``modality`` embeddings as an EmbeddingSource of a local file, or None if it has none.

    Remote files are fetched into ``scratch``; zero rows (samples without the modality) are dropped
    into a scratch copy.
    """
    from mmdata.index import EmbeddingSource

    if not len(ids):
        return None
    rel = embedding_file(modality, name)
    if out.local:
        path = out.path(rel)
    else:
        path = os.path.join(scratch, rel.replace("/", "_"))
        out.fs.get_file(out.path(rel), path)
    rows = np.load(path, mmap_mode="r")
    present = np.flatnonzero(np.any(rows != 0, axis=1))
    if len(present) < len(ids):  # samples without this modality: index only the others
        path = os.path.join(scratch, f"{modality}_{name}.npy")
        np.save(path, np.asarray(rows[present]))
        ids = ids[present]
    return EmbeddingSource(path, ids) if len(ids) else None


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

    ``auto``: for IVF indexes when the units ran on a cluster engine (Dask, Beam); ``on``: for any
    mergeable index (Flat, IVF), on whatever engine; never for a single unit.
    """
    from mmdata.index import is_ivf, is_mergeable

    mode = config.index_distributed
    if mode == "on" and not is_mergeable(index_key):
        raise UserError(NOT_MERGEABLE.format(key=index_key))
    if mode == "off" or n_units < 2:
        return False
    return mode == "on" or (on_engine and config.engine != "local" and is_ivf(index_key))


@contextlib.contextmanager
def local_dir(out: OutputDir) -> Iterator[str]:
    """The output folder as a local path (a staging folder for remote outputs)."""
    if out.local:
        yield out.root
        return
    with tempfile.TemporaryDirectory(prefix="mmdata-index-") as tmp:
        yield tmp


def build_indexes(config: BuildConfig, out: OutputDir, units: list[Unit], engine: Optional["Engine"] = None) -> dict:
    """Write ids.parquet, the indexes and index_infos.json; return the infos by modality.

    ``engine`` (the build's, still open) runs the distributed builds; without one they run here.
    """
    from mmdata.index import build_index, check_index_key, choose_index, faiss_reason
    from mmdata.index.sources import validate_sources
    from mmdata.index_parts import DistributedBuild

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
            key = config.index_key or choose_index(corpus.n, corpus.dim, config.index_memory_gb)
            try:
                if config.index_key:
                    check_index_key(key, corpus.dim)
                if distribute(config, key, len(sources), engine is not None):
                    distributed.train(modality, key, names, sources)
                    continue
                index_path = os.path.join(root, "index", f"{modality}.index")
                infos[modality] = build_index(sources, index_path, index_key=key, memory_gb=config.index_memory_gb,
                                              recall_target=config.index_recall_target)
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
