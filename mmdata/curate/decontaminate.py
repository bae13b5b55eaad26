"""Decontamination (``--exclude-near EVAL_OUT``): per input shard, the alive samples searched in a
flat index of the evaluation build's vectors (built once per worker process)."""
from __future__ import annotations

import numpy as np

from mmdata.arrow import parquet_table
from mmdata.curate.parts import (
    ShardTask,
    present_rows,
    read_part,
    vectors_of,
    write_cand,
    write_part,
)
from mmdata.storage import OutputDir


def _decontaminate_step(task: ShardTask, out: OutputDir) -> dict:
    part = read_part(out, task.folder, task.shard)
    _decontaminate(task, part, **task.args["decontaminate"])
    write_part(out, task.folder, task.shard, part)
    return {"written": write_cand(out, task.folder, task.shard, part)}


_EVAL: dict = {}


def _eval_index(url: str, modality: str):
    """A flat inner-product index of the written ``modality`` vectors of the build at ``url`` (an
    evaluation set), and their keys; kept per process."""
    import faiss

    if (url, modality) not in _EVAL:
        from mmdata.curate.inputs import InputBuild

        ev = InputBuild(url)
        index, keys = None, []
        for shard in ev.shards:
            t = parquet_table(ev.out.read_bytes(f"shards/{shard}.parquet"), columns=["key", "status", "row"],
                              use_threads=False).to_pydict()
            mine = [(k, r) for k, s, r in zip(t["key"], t["status"], t["row"]) if s == "written"]
            if not mine:
                continue
            x = vectors_of(url, shard, modality, np.asarray([r for _, r in mine], dtype=np.int64))
            present = np.any(x != 0, axis=1)
            if index is None:
                index = faiss.IndexFlatIP(x.shape[1])
            index.add(np.ascontiguousarray(x[present]))
            keys += [k for (k, _), ok in zip(mine, present.tolist()) if ok]
        _EVAL.clear()
        _EVAL[(url, modality)] = (index, keys)
    return _EVAL[(url, modality)]


def _decontaminate(task: ShardTask, part: dict, url: str, modality: str, min_cosine: float) -> None:
    index, keys = _eval_index(url, modality)
    alive = np.flatnonzero(np.asarray(part["status"], dtype=object) == "written")
    if index is None or not len(keys) or not len(alive):
        return
    from mmdata.curate.semantic import BLAS_ROWS, SEARCH_CHUNK, search

    ok = present_rows(task.build, task.shard, modality, part["row"][alive])
    pos = alive[ok]
    chunk_of = (task.args["base"] + np.arange(len(pos))) // SEARCH_CHUNK  # searched as one search over the build would
    for c in np.unique(chunk_of).tolist():
        chunk = pos[chunk_of == c]
        x = vectors_of(task.build, task.shard, modality, part["row"][chunk])
        sims, nn = search(index, x, blas=min(SEARCH_CHUNK, task.args["n"] - c * SEARCH_CHUNK) >= BLAS_ROWS)
        for p, s, i in zip(chunk.tolist(), sims[:, 0].tolist(), nn[:, 0].tolist()):
            part["decontaminate_cosine"][p] = float(np.float32(s))
            if s >= min_cosine:
                part["status"][p], part["reason"][p] = "filtered", f"decontaminate:{keys[i]}"


STEPS = {"decontaminate": _decontaminate_step}
