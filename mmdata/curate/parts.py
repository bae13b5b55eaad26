"""The decision state of a curation, on disk: one part per input shard, rewritten by engine tasks.

``<scratch>/parts/<shard>.parquet`` holds one row per row of the input shard's table (``pos``), with
its key rank, status, reason, the measures and scores of the curated table, and for a duplicate the
global position of the sample kept for it (``kept_for``) and the method. A sample's global position
is its shard's offset plus ``pos``. Beside the parts, per shard, memory-mapped arrays the other
shards' tasks look rows up in: ``keys/<shard>.npy`` (the keys, utf-8 bytes), ``cand/<shard>.npy``
(per row: its key rank when it takes part in deduplication, else -1) and ``next/<shard>.npy`` (for
the kept-key resolution). The driver holds only per-shard counts and offsets.

Key rank: the build's plan sorts records by key and cuts units in key order, so the rows of a shard
table are in key order; but a view or segment key (``cat_v01``) sits in its parent's unit, so two
neighbouring shards' key ranges may overlap. Shards whose ranges overlap form a group whose ranks one
task merges (``mmdata.curate.keyrank``); elsewhere the rank is the global position.

The steps of a ``ShardTask`` (run by ``mmdata.curate.steps``) live by what they decide: ``keyrank`` (scan, measure, rank),
``filters`` (the part's first write, CLIP score passes, filters), ``decontaminate``, ``duplicates``
(apply a method's results, pHash sources) and ``plans`` (kept keys, the curated shards' plans).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmdata.arrow import parquet_table
from mmdata.curate.vectors import open_rows, save_npy
from mmdata.storage import OutputDir


def _part_schema() -> pa.Schema:
    from mmdata.curate.write import CURATE_FIELDS

    return pa.schema([pa.field("pos", pa.int32()), pa.field("rank", pa.int64()), pa.field("status", pa.string()),
                      pa.field("reason", pa.string()), pa.field("built", pa.bool_()), pa.field("row", pa.int64()),
                      pa.field("pixels", pa.int64()), pa.field("view", pa.bool_()), pa.field("phash_code", pa.int64()),
                      pa.field("kept_for", pa.int64()), pa.field("method", pa.string())] + CURATE_FIELDS)


def read_part(out: OutputDir, folder: str, shard: str) -> dict:
    t = parquet_table(out.read_bytes(f"{folder}/parts/{shard}.parquet"), use_threads=False)
    part = {name: t.column(name).to_pylist() for name in t.column_names}
    for name in ("rank", "row", "pixels", "kept_for"):
        part[name] = np.asarray(part[name], dtype=np.int64)
    return part


def write_part(out: OutputDir, folder: str, shard: str, part: dict) -> None:
    schema = _part_schema()
    columns = {f.name: pa.array(part[f.name].tolist() if isinstance(part[f.name], np.ndarray) else part[f.name], f.type)
               for f in schema}
    buf = io.BytesIO()
    pq.write_table(pa.table(columns, schema=schema), buf, compression="zstd")
    out.write_bytes(f"{folder}/parts/{shard}.parquet", buf.getvalue())


def write_cand(out: OutputDir, folder: str, shard: str, part: dict) -> int:
    """``cand/<shard>.npy``: per row its key rank when alive and not an augmented view, else -1."""
    ok = np.asarray([s == "written" and not v for s, v in zip(part["status"], part["view"])], dtype=bool)
    save_npy(out, f"{folder}/cand/{shard}.npy", np.where(ok, part["rank"], -1).astype(np.int64))
    return int(np.count_nonzero(np.asarray(part["status"], dtype=object) == "written"))


_NAMES: dict = {}


def shard_names(out: OutputDir, folder: str) -> list[str]:
    """The input shards' names (``<scratch>/shards.json``, saved once by the driver), read once per process."""
    import json

    key = (out.url, folder)
    if key not in _NAMES:
        _NAMES.clear()
        _NAMES[key] = json.loads(out.read_bytes(f"{folder}/shards.json"))
    return _NAMES[key]


def shard_of(offsets: np.ndarray, positions: np.ndarray) -> np.ndarray:
    return np.searchsorted(offsets, positions, side="right") - 1


@dataclass
class ShardTask:
    """One step of the decision over input shard ``shard`` (index ``index``, first global position ``offset``)."""

    build: str
    out: str
    folder: str
    shard: str
    index: int
    offset: int
    step: str
    args: dict = field(default_factory=dict)


def build_table(task: ShardTask, columns: list[str]) -> pa.Table:
    build = OutputDir(task.build)
    t = parquet_table(build.read_bytes(f"shards/{task.shard}.parquet"), use_threads=False)
    return t.select([c for c in columns if c in t.column_names])


def vectors_of(url: str, shard: str, modality: str, rows: np.ndarray) -> np.ndarray:
    """float32 rows of the shard's ``modality`` embeddings (``pair``: image and text, scaled by 1/sqrt(2))."""
    from mmdata.curate.vectors import VectorSet

    mods = ["image", "text"] if modality == "pair" else [modality]
    vs = VectorSet([{"url": url, "rels": [f"embeddings/{m}/{shard}.npy" for m in mods]}],
                   np.zeros(len(rows), np.int64), np.asarray(rows, dtype=np.int64))
    return vs.take(np.arange(len(rows)))


def present_rows(url: str, shard: str, modality: str, rows: np.ndarray) -> np.ndarray:
    """Which of ``rows`` have the modality (a sample without it has a zero row; ``pair``: both)."""
    mods = ["image", "text"] if modality == "pair" else [modality]
    ok = np.ones(len(rows), dtype=bool)
    for m in mods:
        ok &= np.any(np.asarray(open_rows(url, f"embeddings/{m}/{shard}.npy")[rows]) != 0, axis=1)
    return ok
