"""k nearest neighbours of every sample of a batch, from the build's FAISS index, for
retrieval-augmented training or contrastive training with hard negatives.

A whole batch is searched at once (one ``index.search`` of B queries for k + 1 results), the sample
itself is dropped, and the neighbours' stored embeddings are gathered by (shard, row) through
``index/ids.parquet``. The index and the id table are loaded lazily, once per worker process.
"""
from __future__ import annotations

import json
from typing import Optional, Sequence

import numpy as np
import torch
import torch.utils.data

from mmdata.errors import UserError
from mmdata.index.ids import IdTable
from mmdata.loader.store import EmbeddingStore
from mmdata.storage import OutputDir


class NeighbourLookup:
    """``lookup(batch)`` adds ``batch["neighbours"]``: ``id`` (B, k), ``score`` (B, k), ``key`` (B lists),
    ``mask`` (B, k; False where fewer than k neighbours exist or the sample lacks the query modality)
    and ``embeddings`` {modality: (B, k, d)} — the neighbours' stored rows, zero where masked.

    Queries are the samples' own stored ``modality`` embeddings (``batch["embeddings"][modality]``).
    """

    def __init__(self, out: str, k: int, modality: str = "image", embeddings: Optional[Sequence[str]] = None):
        if k < 1:
            raise UserError(f"neighbours must be >= 1, got {k}")
        self.out = OutputDir(out)
        if not self.out.exists("index/index_infos.json"):
            raise UserError(f"{out} has no index: build it with --model … (and without --no-index) to use neighbours")
        self.infos = json.loads(self.out.read_bytes("index/index_infos.json"))
        if modality not in self.infos:
            raise UserError(f"modality {modality!r} is not indexed in {out} (indexed: {', '.join(sorted(self.infos)) or 'none'})")
        self.k = k
        self.modality = modality
        self.embedding_modalities = list(embeddings) if embeddings is not None else [modality]
        self._index = None
        self._table: Optional[IdTable] = None
        self._stores = {m: EmbeddingStore(self.out, m) for m in self.embedding_modalities}

    def __getstate__(self) -> dict:
        # Each worker loads the index itself (once); FAISS indexes do not pickle.
        return {**self.__dict__, "_index": None, "_table": None}

    def _local_index(self) -> str:
        return self.out.local_path(f"index/{self.modality}.index")

    @property
    def index(self):
        if self._index is None:
            from mmdata.index import load_index

            self._index = load_index(self._local_index(), self.infos[self.modality])
            if torch.utils.data.get_worker_info() is not None:  # one thread per worker: the workers are the parallelism
                import faiss

                faiss.omp_set_num_threads(1)
        return self._index

    @property
    def table(self) -> IdTable:
        if self._table is None:
            self._table = IdTable(self.out)
        return self._table

    def search(self, queries: np.ndarray, self_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores), each (B, k): the best k results per query other than ``self_ids``; -1 pads."""
        from mmdata.index import search

        q = np.ascontiguousarray(queries, dtype=np.float32)
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        q = q / np.maximum(norms, 1e-12)
        scores, ids = search(self.index, q, self.k + 1)
        out_ids = np.full((len(q), self.k), -1, dtype=np.int64)
        out_scores = np.zeros((len(q), self.k), dtype=np.float32)
        for i in range(len(q)):
            if norms[i, 0] == 0:  # the sample lacks the query modality
                continue
            keep = (ids[i] != -1) & (ids[i] != self_ids[i])
            got_ids, got_scores = ids[i][keep][:self.k], scores[i][keep][:self.k]
            out_ids[i, :len(got_ids)] = got_ids
            out_scores[i, :len(got_ids)] = got_scores
        return out_ids, out_scores

    def __call__(self, batch: dict) -> dict:
        emb = batch.get("embeddings", {}).get(self.modality)
        if emb is None:
            raise UserError(f"neighbour lookup needs the batch's stored {self.modality!r} embeddings")
        ids, scores = self.search(emb.numpy(), batch["id"].numpy())
        mask = ids != -1
        flat = ids[mask]
        pos = self.table.locate(flat)
        keys = np.full(ids.shape, None, dtype=object)
        keys[mask] = self.table.keys_at(pos)
        gathered = {}
        shard_codes, rows = self.table.shard[pos], self.table.row[pos]
        for m, store in self._stores.items():
            vecs = None
            for code in np.unique(shard_codes):
                sel = shard_codes == code
                part = store.rows(self.table.shard_names[code], rows[sel])
                if vecs is None:
                    vecs = np.zeros((len(flat), part.shape[1]), dtype=np.float32)
                vecs[sel] = part
            if vecs is None:  # no neighbour at all in this batch
                vecs = np.zeros((0, store.array(self.table.shard_names[0]).shape[1]), dtype=np.float32)
            full = np.zeros(ids.shape + (vecs.shape[1],), dtype=np.float32)
            full[mask] = vecs
            gathered[m] = torch.from_numpy(full)
        batch["neighbours"] = {"id": torch.from_numpy(ids), "score": torch.from_numpy(scores),
                               "mask": torch.from_numpy(mask), "key": keys.tolist(), "embeddings": gathered}
        return batch
