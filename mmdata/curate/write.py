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
import pyarrow.compute as pc

from mmdata.arrow import parquet_table
from mmdata.curate.decide import SCORE_COLUMNS
from mmdata.curate.markers import mark_done
from mmdata.curate.members import member_index, stream_samples
from mmdata.curate.vectors import open_rows
from mmdata.schema import SHARD_SCHEMA
from mmdata.storage import OutputDir
from mmdata.writers.table import arrow_table_bytes
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
    """Write curated shard ``task.name``; return its stats (the same bytes on every run).

    Memory: the shard's own table (every row it spans, as Arrow columns) and its kept samples'
    embedding rows, one input shard's table at a time, one kept sample's members at a time — not
    the input rows the shard spans (with many duplicates, a shard of 1,000 kept samples spans
    tens of thousands)."""
    build, out = OutputDir(task.build), OutputDir(task.out)
    plan = parquet_table(out.read_bytes(f"{task.folder}/units/{task.name}.parquet"), use_threads=False)
    status = plan.column("status").combine_chunks()
    written = np.asarray(pc.equal(status, pa.scalar("written", pa.string())).to_numpy(zero_copy_only=False), dtype=bool)
    table, source, in_row = _table(build, plan, written)
    keys = table.column("key").filter(pa.array(written)).to_pylist()  # the kept samples, in order
    sources = [source[i] for i in np.flatnonzero(written).tolist()]
    tokens: dict[str, bytes] = {}
    if task.tokenizer:
        from mmdata.curate.text import token_ids
        from mmdata.writers.npy import npy_bytes

        captions = table.column("caption").filter(pa.array(written)).to_pylist()
        texts = [(k, c) for k, c in zip(keys, captions) if c is not None]
        tokens = {k: npy_bytes(np.asarray(ids, dtype=np.int32))
                  for (k, _), ids in zip(texts, token_ids(task.tokenizer, [c for _, c in texts]))}
    wanted: dict[str, set[str]] = {}
    for s, k in zip(sources, keys):
        wanted.setdefault(s, set()).add(k)
    index = {s: member_index(build, s, ks) for s, ks in sorted(wanted.items())}  # a missing member fails here

    def samples():
        for key, members in stream_samples(build, zip(sources, keys), index):
            yield key, ({**members, "llm_tokens.npy": tokens[key]} if key in tokens else members)

    with out.atomic_open(f"shards/{task.name}.tar") as fh:
        write_tar(fh, samples())
        tar_bytes = fh.tell()
    out.write_bytes(f"shards/{task.name}.parquet", arrow_table_bytes(table))
    for modality in task.modalities:
        out.write_bytes(f"embeddings/{modality}/{task.name}.npy", _embedding_rows(build, modality, sources, in_row))
    reasons: dict[str, Counter] = {"filtered": Counter(), "failed": Counter()}
    for st, counts in reasons.items():
        reason = plan.column("reason").filter(pc.equal(status, st))
        for item in pc.value_counts(reason).to_pylist():
            counts[summary_reason(item["values"])] += item["counts"]
    n_status = {st: int(pc.sum(pc.equal(status, pa.scalar(st, pa.string()))).as_py() or 0) for st in ("written", "filtered", "failed")}
    stats = {"unit": int(task.name), "shard": f"{task.name}.tar", "config_hash": task.config_hash,
             "counts": {"records": plan.num_rows, "inputs": plan.num_rows, **n_status},
             "reasons": {k: dict(sorted(v.items())) for k, v in reasons.items()}, "tar_bytes": tar_bytes,
             "embeddings": {m: {"rows": len(keys)} for m in task.modalities}}
    out.write_bytes(f"shards/{task.name}_stats.json", json.dumps(stats, indent=1, sort_keys=True).encode())
    mark_done(out, task.folder, "write", task.name, stats)
    return stats


def _table(build: OutputDir, plan: pa.Table, written: np.ndarray) -> tuple[pa.Table, list[str], np.ndarray]:
    """The curated table of ``plan`` (its input rows, then the plan's status, reason and scores, and
    ``row`` renumbered over the kept samples); the input shard of each row; the input ``row`` (the
    embedding row) of each kept sample. The input shards are read one at a time, the rows needed only."""
    names = plan.column("in_shard").combine_chunks().dictionary_encode()
    shard_names, shard_of = names.dictionary.to_pylist(), names.indices.to_numpy(zero_copy_only=False)
    in_pos = plan.column("in_pos").to_numpy()
    pieces, where = [], []
    for i in sorted(range(len(shard_names)), key=shard_names.__getitem__):
        mine = np.flatnonzero(shard_of == i)
        data = parquet_table(build.read_bytes(f"shards/{shard_names[i]}.parquet"), use_threads=False)
        data = data.take(pa.array(in_pos[mine]))
        pieces.append(pa.table([data.column(f.name).cast(f.type) if f.name in data.column_names else pa.nulls(len(mine), f.type)
                                for f in SHARD_SCHEMA], schema=SHARD_SCHEMA))
        where.append(mine)
        del data
    if pieces:
        rows = pa.concat_tables(pieces)
        placed = np.concatenate(where)
        if np.any(placed[1:] < placed[:-1]):  # input shards interleave in key order: put the rows back in plan order
            order = np.empty(plan.num_rows, dtype=np.int64)
            order[placed] = np.arange(plan.num_rows)
            rows = rows.take(pa.array(order))
    else:
        rows = SHARD_SCHEMA.empty_table()
    del pieces
    renumbered = np.cumsum(written) - 1
    columns = {f.name: rows.column(f.name) for f in SHARD_SCHEMA}
    columns["status"], columns["reason"] = plan.column("status"), plan.column("reason")
    columns["row"] = pa.array(renumbered.astype(np.int32), pa.int32(), mask=~written)
    columns.update({f.name: plan.column(f.name) for f in CURATE_FIELDS})
    in_row = rows.column("row").filter(pa.array(written)).to_numpy(zero_copy_only=False)
    source = [shard_names[i] for i in shard_of.tolist()]
    return pa.table(columns, schema=CURATED_SCHEMA), source, in_row


def _embedding_rows(build: OutputDir, modality: str, sources: list[str], in_rows: np.ndarray) -> bytes:
    """The input embedding rows of the written samples (input shard ``sources[i]``, row ``in_rows[i]``),
    in order, as ``.npy`` bytes (input dtype); each input file memory-mapped in turn."""
    sources_arr = np.asarray(sources, dtype=object)
    out = None
    for shard in sorted(set(sources)):
        arr = open_rows(build.url, f"embeddings/{modality}/{shard}.npy")
        if out is None:
            out = np.zeros((len(sources), arr.shape[1]), dtype=arr.dtype)
        mine = np.flatnonzero(sources_arr == shard)
        out[mine] = arr[np.asarray(in_rows[mine], dtype=np.int64)]
        del arr
    if out is None:  # no written sample: an empty file of the build's dtype and dimension
        arr = np.load(build.local_path(_first_embedding(build, modality)), mmap_mode="r", allow_pickle=False)
        out = np.zeros((0, arr.shape[1]), dtype=arr.dtype)
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
