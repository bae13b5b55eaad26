"""The build being curated, held as columns: one position per row of its shard tables, in shard
then table order (key order), with the few columns curation decides on."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmdata.curate.vectors import VectorSet, open_rows
from mmdata.errors import UserError
from mmdata.storage import OutputDir

COLUMNS = ["key", "status", "reason", "row", "orig_width", "orig_height", "view_of"]  # captions and hashes stay
# in the shards: the measure and exact-dedup tasks read them there


class InputBuild:
    """A finished build: manifest, shard names and the decision columns of every row."""

    def __init__(self, url: str):
        self.url = url
        self.out = OutputDir(url)
        if not self.out.exists("manifest.json") or not self.out.exists("shards/sizes.json"):
            raise UserError(f"{url}: not a finished mmdata build (no manifest.json or shards/sizes.json)")
        try:
            self.manifest = json.loads(self.out.read_bytes("manifest.json"))
            sizes = json.loads(self.out.read_bytes("shards/sizes.json"))
        except ValueError as exc:
            raise UserError(f"{url}: unreadable manifest.json or sizes.json ({exc})") from None
        self.shards = sorted(name[: -len(".tar")] for name in sizes)
        self.modalities = list((self.manifest.get("embeddings") or {}).get("modalities") or [])
        tables, shard_of = [], []
        for i, name in enumerate(self.shards):
            try:
                t = pq.read_table(io.BytesIO(self.out.read_bytes(f"shards/{name}.parquet")), use_threads=False)
            except (OSError, pa.ArrowException) as exc:
                raise UserError(f"{url}: cannot read shards/{name}.parquet ({exc})") from None
            t = t.select([c for c in COLUMNS if c in t.column_names])
            tables.append(t)
            shard_of.append(np.full(t.num_rows, i, dtype=np.int32))
        self.table = pa.concat_tables(tables, promote_options="default") if tables else pa.table({c: [] for c in COLUMNS})
        self.shard = np.concatenate(shard_of) if shard_of else np.zeros(0, np.int32)
        self.pos = np.concatenate([np.arange(len(s), dtype=np.int32) for s in shard_of]) if shard_of else np.zeros(0, np.int32)
        self.status = np.asarray(self.table.column("status").to_pylist(), dtype=object)
        self.keys = self.table.column("key").to_pylist()
        self.row = np.asarray(pc.fill_null(self.table.column("row").cast(pa.int64()), -1).to_numpy(), dtype=np.int64)
        self.written = self.status == "written"
        order = np.argsort(np.asarray(self.keys, dtype=object), kind="stable")
        self.rank = np.empty(len(order), dtype=np.int64)  # key order of each position
        self.rank[order] = np.arange(len(order))

    def __len__(self) -> int:
        return len(self.keys)

    def column(self, name: str) -> list:
        return self.table.column(name).to_pylist() if name in self.table.column_names else [None] * len(self)

    def vectors(self, modality: str, positions: np.ndarray) -> tuple[VectorSet, np.ndarray]:
        """The ``modality`` embeddings (``pair``: image and text) of the written ``positions`` that have
        them (a sample without the modality has a zero row): (vector set, the positions it holds)."""
        mods = ["image", "text"] if modality == "pair" else [modality]
        if any(m not in self.modalities for m in mods):
            raise UserError(f"{self.url} has no {'/'.join(mods)} embeddings (it has: {', '.join(self.modalities) or 'none'})")
        positions = np.asarray(positions, dtype=np.int64)
        parts, part, rows, kept = [], [], [], []
        for i, name in enumerate(self.shards):
            mine = positions[self.shard[positions] == i]
            if not len(mine):
                continue
            r = self.row[mine]
            rels = [f"embeddings/{m}/{name}.npy" for m in mods]
            present = np.ones(len(r), dtype=bool)
            for rel in rels:
                present &= np.any(np.asarray(open_rows(self.url, rel)[r]) != 0, axis=1)
            parts.append({"url": self.url, "rels": rels})
            part.append(np.full(int(present.sum()), len(parts) - 1, dtype=np.int64))
            rows.append(r[present])
            kept.append(mine[present])
        return VectorSet(parts, _cat(part), _cat(rows)), _cat(kept)


def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
