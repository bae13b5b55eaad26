"""Writing the curated build: every input row once, in key order, re-cut into shards of
``samples_per_shard`` kept samples, members and embedding rows copied byte for byte from the input.

One engine task per output shard reads its plan (``<scratch>/units/<name>.parquet``: input shard,
input row, decision), the input shards it draws from, and writes tar, parquet, embeddings and the
``_stats.json`` commit marker, each atomically.
"""
from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmdata.curate.decide import SCORE_COLUMNS
from mmdata.curate.features import read_members
from mmdata.curate.markers import mark_done
from mmdata.schema import SHARD_SCHEMA
from mmdata.storage import OutputDir
from mmdata.writers.table import table_bytes
from mmdata.writers.tar import write_tar

CURATE_FIELDS = [
    pa.field("clip_score", pa.float32()),
    pa.field("language", pa.string()),
    pa.field("language_score", pa.float32()),
    pa.field("words", pa.int32()),
    pa.field("tokens", pa.int32()),
    pa.field("speech_ratio", pa.float32()),
    pa.field("loudness", pa.float32()),
    pa.field("clipping", pa.float32()),
    pa.field("phash", pa.string()),
    pa.field("duplicate_of", pa.string()),
    pa.field("duplicate_score", pa.float32()),
    pa.field("decontaminate_cosine", pa.float32()),
]
assert tuple(f.name for f in CURATE_FIELDS) == SCORE_COLUMNS
CURATED_SCHEMA = pa.schema(list(SHARD_SCHEMA) + CURATE_FIELDS)
PLAN_SCHEMA = pa.schema([pa.field("in_shard", pa.string(), nullable=False), pa.field("in_pos", pa.int32(), nullable=False),
                         pa.field("status", pa.string(), nullable=False), pa.field("reason", pa.string())]
                        + CURATE_FIELDS)


def summary_reason(reason: str) -> str:
    """The reason as counted in stats and manifest: ``duplicate:<method>`` and ``decontaminate``
    without the key (the parquet rows keep the key)."""
    if reason.startswith("duplicate:"):
        return ":".join(reason.split(":")[:2])
    if reason.startswith("decontaminate:"):
        return "decontaminate"
    return reason


@dataclass
class WriteTask:
    build: str
    out: str
    folder: str
    name: str
    modalities: list[str]
    config_hash: str
    tokenizer: str | None = None  # set: write {key}.llm_tokens.npy into kept samples


def run_write_task(task: WriteTask) -> dict:
    """Write curated shard ``task.name``; return its stats (the same bytes on every run)."""
    build, out = OutputDir(task.build), OutputDir(task.out)
    plan = pq.read_table(io.BytesIO(out.read_bytes(f"{task.folder}/units/{task.name}.parquet")), use_threads=False).to_pylist()
    sources = sorted({p["in_shard"] for p in plan})
    tables = {s: pq.read_table(io.BytesIO(build.read_bytes(f"shards/{s}.parquet")), use_threads=False).to_pylist()
              for s in sources}
    needed: dict[str, set[str]] = {}  # input shard → keys of its kept samples (one tar in memory at a time)
    for p in plan:
        if p["status"] == "written":
            needed.setdefault(p["in_shard"], set()).add(tables[p["in_shard"]][p["in_pos"]]["key"])
    members = {s: read_members(build.read_bytes(f"shards/{s}.tar"), keys) for s, keys in sorted(needed.items())}
    rows, written, emb_rows = [], [], []
    for p in plan:
        row = dict(tables[p["in_shard"]][p["in_pos"]])
        in_row = row.get("row")
        row.update({k: p[k] for k in ("status", "reason")}, **{f.name: p[f.name] for f in CURATE_FIELDS})
        row["row"] = None
        if p["status"] == "written":
            row["row"] = len(written)
            written.append((row["key"], members[p["in_shard"]][row["key"]]))
            emb_rows.append((p["in_shard"], in_row))
        rows.append(row)
    if task.tokenizer:
        from mmdata.curate.text import token_ids
        from mmdata.writers.npy import npy_bytes

        by_key = {r["key"]: r["caption"] for r in rows if r["status"] == "written" and r["caption"] is not None}
        texts = [k for k, _ in written if k in by_key]
        ids = dict(zip(texts, token_ids(task.tokenizer, [by_key[k] for k in texts])))
        written = [(k, {**m, "llm_tokens.npy": npy_bytes(np.asarray(ids[k], dtype=np.int32))} if k in ids else m)
                   for k, m in written]
    with out.atomic_open(f"shards/{task.name}.tar") as fh:
        write_tar(fh, written)
        tar_bytes = fh.tell()
    out.write_bytes(f"shards/{task.name}.parquet", table_bytes(rows, CURATED_SCHEMA))
    for modality in task.modalities:
        out.write_bytes(f"embeddings/{modality}/{task.name}.npy", _embedding_rows(build, modality, emb_rows))
    status = Counter(r["status"] for r in rows)
    reasons: dict[str, Counter] = {"filtered": Counter(), "failed": Counter()}
    for r in rows:
        if r["status"] in reasons:
            reasons[r["status"]][summary_reason(r["reason"])] += 1
    stats = {"unit": int(task.name), "shard": f"{task.name}.tar", "config_hash": task.config_hash,
             "counts": {"records": len(rows), "inputs": len(rows), **{s: status[s] for s in ("written", "filtered", "failed")}},
             "reasons": {k: dict(sorted(v.items())) for k, v in reasons.items()}, "tar_bytes": tar_bytes,
             "embeddings": {m: {"rows": len(written)} for m in task.modalities}}
    out.write_bytes(f"shards/{task.name}_stats.json", json.dumps(stats, indent=1, sort_keys=True).encode())
    mark_done(out, task.folder, "write", task.name, stats)
    return stats


def _embedding_rows(build: OutputDir, modality: str, rows: list[tuple[str, int]]) -> bytes:
    """The input embedding rows of the written samples, in order, as ``.npy`` bytes (input dtype)."""
    blocks, dtype, dim = [], None, None
    for shard in sorted({s for s, _ in rows}):
        arr = np.load(io.BytesIO(build.read_bytes(f"embeddings/{modality}/{shard}.npy")), allow_pickle=False)
        dtype, dim = arr.dtype, arr.shape[1]
        blocks.append((shard, arr))
    if dtype is None:  # no written sample: an empty file of the build's dtype and dimension
        arr = np.load(build.local_path(_first_embedding(build, modality)), mmap_mode="r", allow_pickle=False)
        dtype, dim = arr.dtype, arr.shape[1]
    by_shard = dict(blocks)
    out = np.zeros((len(rows), dim), dtype=dtype)
    for i, (shard, r) in enumerate(rows):
        out[i] = by_shard[shard][r]
    buf = io.BytesIO()
    np.save(buf, out, allow_pickle=False)
    return buf.getvalue()


def _first_embedding(build: OutputDir, modality: str) -> str:
    return build.glob(f"embeddings/{modality}/*.npy")[0]


def cut(order: list[int], written: list[bool], per_shard: int) -> list[list[int]]:
    """Positions in key order cut into shards of ``per_shard`` written rows; removed rows stay beside
    their key neighbours; the last shard takes the rest (one shard at least)."""
    shards, current, n = [], [], 0
    for p, w in zip(order, written):
        if w and n == per_shard:
            shards.append(current)
            current, n = [], 0
        current.append(p)
        n += w
    shards.append(current)
    return shards
