"""The index step of finalize: ``index/ids.parquet`` and one FAISS index per embedded modality.

Index ids are the samples' 64-bit ids. Samples that lack a modality have a zero row in that
modality's embedding file; they are left out of its index.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmdata.config import BuildConfig
from mmdata.records import Unit
from mmdata.storage import OutputDir
from mmdata.unit import embedding_file, shard_files
from mmdata.writers.table import table_bytes

IDS_SCHEMA = pa.schema([
    pa.field("id", pa.int64(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("row", pa.int32(), nullable=False),
    pa.field("caption", pa.string()),
])


def written_rows(out: OutputDir, units: list[Unit]) -> list[dict]:
    """id, key, shard, row, caption of every written sample, in shard then row order."""
    rows = []
    for unit in units:
        table = pq.read_table(io.BytesIO(out.read_bytes(shard_files(unit.name)["parquet"])),
                              columns=["id", "key", "status", "row", "caption"])
        for r in table.to_pylist():
            if r["status"] == "written":
                rows.append({"id": r["id"], "key": r["key"], "shard": f"{unit.name}.tar", "row": r["row"], "caption": r["caption"]})
    return rows


@contextlib.contextmanager
def local_dir(out: OutputDir) -> Iterator[str]:
    """The output folder as a local path (a staging folder for remote outputs)."""
    if out.local:
        yield out.root
        return
    with tempfile.TemporaryDirectory(prefix="mmdata-index-") as tmp:
        yield tmp


def build_indexes(config: BuildConfig, out: OutputDir, units: list[Unit]) -> dict:
    """Write ids.parquet, the indexes and index_infos.json; return the infos by modality."""
    from mmdata.index import EmbeddingSource, build_index

    rows = written_rows(out, units)
    out.write_bytes("index/ids.parquet", table_bytes(rows, IDS_SCHEMA))
    infos: dict[str, dict] = {}
    ids_by_shard: dict[str, list[int]] = {}
    for r in rows:
        ids_by_shard.setdefault(r["shard"][:-4], []).append(r["id"])
    with local_dir(out) as root, tempfile.TemporaryDirectory(prefix="mmdata-emb-") as scratch:
        os.makedirs(os.path.join(root, "index"), exist_ok=True)
        for modality in config.embedded_modalities:
            sources = []
            for unit in units:
                ids = np.asarray(ids_by_shard.get(unit.name, []), dtype=np.int64)
                if not len(ids):
                    continue
                rel = embedding_file(modality, unit.name)
                path = os.path.join(root, rel) if out.local else os.path.join(scratch, rel.replace("/", "_"))
                if not out.local:
                    out.fs.get_file(out.path(rel), path)
                rows_ = np.load(path, mmap_mode="r")
                present = np.flatnonzero(np.any(rows_ != 0, axis=1))
                if len(present) < len(ids):  # samples without this modality: index only the others
                    path = os.path.join(scratch, f"{modality}_{unit.name}.npy")
                    np.save(path, np.asarray(rows_[present]))
                    ids = ids[present]
                if len(ids):
                    sources.append(EmbeddingSource(path, ids))
            if not sources:
                continue
            index_path = os.path.join(root, "index", f"{modality}.index")
            infos[modality] = build_index(sources, index_path, memory_gb=config.index_memory_gb,
                                          recall_target=config.index_recall_target)
            if not out.local:
                out.fs.put_file(index_path, out.path(f"index/{modality}.index"))
    out.write_bytes("index/index_infos.json", json.dumps(infos, indent=1, sort_keys=True, default=str).encode())
    return infos
