"""SemDeDup over the candidates of a curation, with no per-candidate array on the driver: per input
shard, a task lists its candidates that have the modality (``cands/<shard>.npy``: global position,
embedding row) and then assigns them to the centres (``assign/<shard>.npy``, ``sizes/<shard>.npy``);
k-means trains on the driver from a seeded sample of at most ``train_size`` vectors; the cluster
tasks gather their clusters' members from the per-shard files and write (duplicate, kept, cosine)
over global positions, sorted by duplicate."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmdata.curate.markers import mark_done
from mmdata.curate.parts import present_rows, read_part, shard_names, vectors_of
from mmdata.curate.semantic import (
    BLAS_ROWS,
    SEARCH_CHUNK,
    VectorSet,
    _dedup_members,
    search,
)
from mmdata.curate.vectors import load_npy, save_npy
from mmdata.storage import OutputDir


@dataclass
class SemShardTask:
    build: str
    out: str
    folder: str
    scratch: str
    shard: str
    offset: int
    modality: str
    step: str  # "cands" or "assign"
    base: int = 0  # candidates in the shards before this one
    n: int = 0  # candidates in all


def run_sem_shard_task(task: SemShardTask) -> dict:
    out = OutputDir(task.out)
    if task.step == "cands":
        cand = load_npy(out, f"{task.scratch}/cand/{task.shard}.npy")
        pos = np.flatnonzero(cand >= 0)
        rows = read_part(out, task.scratch, task.shard)["row"][pos]
        ok = present_rows(task.build, task.shard, task.modality, rows) if len(pos) else np.zeros(0, bool)
        save_npy(out, f"{task.folder}/cands/{task.shard}.npy", np.stack([task.offset + pos[ok], rows[ok]]).astype(np.int64))
        return {"n": int(ok.sum())}
    import faiss

    centres = load_npy(out, f"{task.folder}/centres.npy")
    gpos, rows = load_npy(out, f"{task.folder}/cands/{task.shard}.npy")
    index = faiss.IndexFlatIP(centres.shape[1])
    index.add(centres)
    cluster = np.zeros(len(rows), dtype=np.int32)
    sim = np.zeros(len(rows), dtype=np.float32)
    chunk = (task.base + np.arange(len(rows))) // SEARCH_CHUNK
    for c in np.unique(chunk).tolist():  # the rows of one chunk of the global candidate order, searched as one batch
        sel = np.flatnonzero(chunk == c)
        x = vectors_of(task.build, task.shard, task.modality, rows[sel])
        d, i = search(index, x, blas=min(SEARCH_CHUNK, task.n - c * SEARCH_CHUNK) >= BLAS_ROWS)
        cluster[sel], sim[sel] = i[:, 0], d[:, 0]
    save_npy(out, f"{task.folder}/assign/{task.shard}.npy",
             np.stack([gpos, rows, cluster.astype(np.int64), sim.astype(np.float64).view(np.int64)]))
    save_npy(out, f"{task.folder}/sizes/{task.shard}.npy", np.bincount(cluster, minlength=len(centres)).astype(np.int64))
    return {}


@dataclass
class PartsClusterTask:
    build: str
    out: str
    folder: str
    task: int
    clusters: list[int]
    threshold: float
    keep: str
    scratch: str
    modality: str
    centres: str = ""  # digest of the centres the clusters are of: a marker of other centres is not trusted


def done_mark(task: PartsClusterTask) -> dict:
    """What a cluster task's marker says it did: a resumed run redoes a task whose marker differs (its
    grouping depends on the worker count; its clusters on the centres)."""
    return {"clusters": [int(c) for c in task.clusters], "centres": task.centres}


def run_parts_cluster_task(task: PartsClusterTask) -> dict:
    """Dedup the task's clusters; write ``result_<task>.npy`` (3, n): duplicate, kept, cosine (float64
    bits) over global positions, sorted by duplicate. Idempotent."""
    out = OutputDir(task.out)
    shards = shard_names(out, task.scratch)
    mods = ["image", "text"] if task.modality == "pair" else [task.modality]
    wanted = np.asarray(task.clusters, dtype=np.int64)
    gpos, part, rows, cluster, sim = [], [], [], [], []
    for i, shard in enumerate(shards):
        a = load_npy(out, f"{task.folder}/assign/{shard}.npy")
        sel = np.isin(a[2], wanted)
        gpos.append(a[0, sel])
        part.append(np.full(int(sel.sum()), i, np.int64))
        rows.append(a[1, sel])
        cluster.append(a[2, sel])
        sim.append(a[3, sel].view(np.float64).astype(np.float32))
    gpos, part, rows = np.concatenate(gpos), np.concatenate(part), np.concatenate(rows)
    vectors = VectorSet([{"url": task.build, "rels": [f"embeddings/{m}/{s}.npy" for m in mods]} for s in shards],
                        part, rows)
    found = _dedup_members(task.clusters, np.concatenate(cluster), np.concatenate(sim), gpos,
                           vectors.take(np.arange(len(rows))), task.threshold, task.keep)
    found = found[np.argsort(found[:, 0], kind="stable")]
    cos = (found[:, 2] / 1e6).astype(np.float32).astype(np.float64)
    save_npy(out, f"{task.folder}/result_{task.task:05d}.npy", np.stack([found[:, 0], found[:, 1], cos.view(np.int64)]))
    mark_done(out, task.folder, "cluster", f"{task.task:05d}", {"duplicates": int(len(found)), **done_mark(task)})
    return {"task": task.task, "duplicates": int(len(found))}
