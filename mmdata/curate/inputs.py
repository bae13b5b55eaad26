"""The build being curated: its manifest, shard names and embedded modalities. Its rows stay in its
shards: the engine tasks of a curation read them there (``mmdata.curate.parts``)."""
from __future__ import annotations

import json

from mmdata.errors import UserError
from mmdata.storage import OutputDir


class InputBuild:
    """A finished build: manifest, shard names, modalities. Nothing per row."""

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
        for name in self.shards:
            if not self.out.exists(f"shards/{name}.parquet"):
                raise UserError(f"{url}: cannot read shards/{name}.parquet (missing)")

    def dim(self, modality: str) -> int | None:
        """The dimension of the ``modality`` embeddings (``pair``: image + text), None without files."""
        from mmdata.curate.vectors import open_rows

        mods = ["image", "text"] if modality == "pair" else [modality]
        total = 0
        for m in mods:
            files = self.out.glob(f"embeddings/{m}/*.npy")
            if not files:
                return None
            total += open_rows(self.url, files[0]).shape[1]
        return total
