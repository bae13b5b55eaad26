"""Retriever: query a build's FAISS indexes by text, image, audio, key or raw embedding.

Queries are embedded with the model recorded in the build's manifest; asking for another model
is an error, never a silent mismatch. The image, text and fused indexes live in the open_clip
space; the audio index in the space of the build's audio encoder (mel-stats or CLAP), so audio
queries and text queries against ``modality="audio"`` go through that encoder, re-created from
the manifest, and a query audio file goes through the build's own audio processing first.
"""
from __future__ import annotations

import io
import json
import posixpath
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmdata.embed_switch import finish_switch
from mmdata.errors import UserError
from mmdata.index.ids import IdTable
from mmdata.storage import OutputDir, read_bytes
from mmdata.transforms.image import to_rgb

TIE_EXTRA = 8  # results fetched beyond k, to see whether the k-th score is tied with later ones
TIE_TOL = 1e-6  # relative: scores this close are equal (the same vector scored in another batch)


def _tie_tol(score: float) -> float:
    return TIE_TOL * max(1.0, abs(score))


def order_ties_by_id(pairs: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """(score, id) pairs best first, equal scores (within ``TIE_TOL``) by ascending id.

    So results are stable: the top 2 are the first 2 of the top 5 even among identical copies.
    """
    pairs = sorted(pairs, key=lambda p: (-p[0], p[1]))
    out: list[tuple[float, int]] = []
    group: list[tuple[float, int]] = []
    for pair in pairs:
        if group and pair[0] < group[0][0] - _tie_tol(group[0][0]):
            out += sorted(group, key=lambda p: p[1])
            group = []
        group.append(pair)
    return out + sorted(group, key=lambda p: p[1])


@dataclass
class Hit:
    rank: int
    score: float
    id: int
    key: str
    caption: Optional[str]
    shard: str
    row: int

    def to_dict(self) -> dict:
        return asdict(self)


class Retriever:
    """``Retriever(OUT).search_text("a cat", k=5)`` → hits, best first."""

    def __init__(self, out: str, device: str = "cpu"):
        self.out = OutputDir(out)
        finish_switch(self.out)  # an `mmdata embed` killed during its switch: finish it before reading
        if not self.out.exists("index/index_infos.json"):
            raise UserError(f"{out} has no index (build it with --model … or --audio-encoder …, without --no-index)")
        self.infos = json.loads(self.out.read_bytes("index/index_infos.json"))
        self.manifest = json.loads(self.out.read_bytes("manifest.json"))
        self._ids = IdTable(self.out, captions=True)  # arrays: no per-row Python objects
        self.device = device
        self._indexes: dict = {}
        self._encoder = None
        self._audio_encoder = None

    @property
    def modalities(self) -> list[str]:
        return sorted(self.infos)

    def index(self, modality: str):
        if modality not in self.infos:
            raise UserError(f"modality {modality!r} is not indexed in {self.out.url} (indexed: {', '.join(self.modalities) or 'none'})")
        if modality not in self._indexes:
            from mmdata.index import load_index

            self._indexes[modality] = load_index(self._local_index(modality), self.infos[modality])
        return self._indexes[modality]

    def _local_index(self, modality: str) -> str:
        return self.out.local_path(f"index/{modality}.index")

    def encoder(self, model: Optional[str] = None, pretrained: Optional[str] = None):
        """The build's encoder; ``model``/``pretrained`` must match what the build used."""
        facts = self.manifest.get("embeddings", {}).get("encoder")
        if not facts:
            raise UserError(f"{self.out.url} records no embedding model; query with --embedding or --key")
        if (model and model != facts["model"]) or (pretrained and pretrained not in (facts["pretrained"], facts.get("checkpoint"))):
            raise UserError(f"the index was built with {facts['model']}/{facts['pretrained']}; a query embedded with "
                            f"{model or facts['model']}/{pretrained or facts['pretrained']} would not be comparable")
        if self._encoder is None:
            from mmdata.encoders.clip import ClipEncoder

            weights = None if facts["weights"] == "random" else (pretrained or facts["pretrained"])
            enc = ClipEncoder(model=facts["model"], pretrained=weights, device=self.device, seed=facts.get("seed") or 0)
            enc.setup()
            got = enc.info()
            if facts.get("checkpoint_sha256") and got.get("checkpoint_sha256") != facts["checkpoint_sha256"]:
                raise UserError(f"checkpoint {got.get('checkpoint')} differs from the one the index was built with "
                                f"(sha256 {facts['checkpoint_sha256'][:12]}…)")
            self._encoder = enc
        return self._encoder

    def search_embedding(self, query: np.ndarray, k: int = 10, modality: str = "image", exclude: Optional[int] = None) -> list[Hit]:
        from mmdata.index import search

        index = self.index(modality)
        q = np.asarray(query, dtype=np.float32).reshape(1, -1)
        if q.shape[1] != index.d:
            raise UserError(f"query has dimension {q.shape[1]}, the {modality} index {index.d}")
        q /= max(float(np.linalg.norm(q)), 1e-12)
        need = k + (1 if exclude is not None else 0)
        fetch = min(need + TIE_EXTRA, max(int(index.ntotal), 1))
        while True:  # widen until the k-th score has no tie beyond what was fetched
            scores, ids = search(index, q, fetch)
            found = ids[0] != -1
            if fetch >= index.ntotal or not found.all() or fetch <= need:
                break
            boundary = float(scores[0][need - 1])
            if float(scores[0][-1]) < boundary - _tie_tol(boundary):
                break
            fetch = min(2 * fetch, int(index.ntotal))
        pairs = [(float(score), int(id_)) for score, id_ in zip(scores[0], ids[0]) if id_ != -1 and id_ != exclude]
        kept = order_ties_by_id(pairs)[:k]
        rows = self._ids.records(self._ids.locate(np.asarray([id_ for _, id_ in kept], dtype=np.int64)))
        return [Hit(rank, score, id_, r["key"], r["caption"], r["shard"], r["row"])
                for rank, ((score, id_), r) in enumerate(zip(kept, rows), start=1)]

    def audio_encoder(self, model: Optional[str] = None):
        """The build's audio encoder (mel-stats or CLAP), re-created from the manifest's facts;
        ``model`` (a CLAP id or folder) must match what the build used."""
        facts = (self.manifest.get("embeddings") or {}).get("audio_encoder")
        if not facts:
            raise UserError(f"{self.out.url} records no audio encoder; query the audio index with --key or --embedding")
        if model and model != facts.get("model"):
            built = f"CLAP {facts['model']}" if facts.get("model") else facts["name"]
            raise UserError(f"the audio index was built with {built}; a query embedded with {model} would not be comparable")
        if self._audio_encoder is None:
            from mmdata.encoders.factory import audio_encoder_facts, audio_encoder_from_facts

            try:
                enc = audio_encoder_from_facts(facts, device=self.device)
            except ImportError as exc:
                raise UserError(f"audio queries need the 'audio' extra (pip install 'mmdata[audio]'): {exc}") from None
            got = audio_encoder_facts(enc)
            differs = sorted(k for k in facts if k in got and got[k] != facts[k])
            if differs:
                raise UserError(f"the audio encoder re-created from {facts.get('model') or facts['name']} differs from the one "
                                f"the index was built with ({', '.join(differs)}); its queries would not be comparable")
            self._audio_encoder = enc
        return self._audio_encoder

    def _audio_text_encoder(self, model: Optional[str], pretrained: Optional[str]):
        facts = (self.manifest.get("embeddings") or {}).get("audio_encoder") or {}
        if facts.get("name") == "mel-stats":
            raise UserError("mel-stats has no text tower; query the audio index with --audio, --key or --embedding")
        if pretrained:
            raise UserError("--pretrained names open_clip weights; the audio index is queried with the build's CLAP model")
        return self.audio_encoder(model)

    def search_text(self, text: str, k: int = 10, modality: str = "image", **model) -> list[Hit]:
        """Text → neighbours: open_clip's text tower for image/text/fused, CLAP's for audio."""
        self.index(modality)
        if modality == "audio":
            encoder = self._audio_text_encoder(model.get("model"), model.get("pretrained"))
        else:
            encoder = self.encoder(**model)
        return self.search_embedding(encoder.encode_texts([text])[0], k, modality)

    def search_image(self, path: str, k: int = 10, modality: str = "image", **model) -> list[Hit]:
        if modality == "audio":
            raise UserError("an image query cannot search the audio index (no encoder maps images into the audio "
                            "space); use --modality image, text or fused")
        self.index(modality)
        try:
            im = Image.open(io.BytesIO(read_bytes(path)))
            im.load()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
            raise UserError(f"cannot read query image {path}: {exc}") from None
        return self.search_embedding(self.encoder(**model).encode_images([to_rgb(im)])[0], k, modality)

    def audio_query(self, path_or_url: str) -> tuple[np.ndarray, int]:
        """The query file decoded and processed exactly as the build processes a clip (its
        AudioConfig: rate, channels, trimming, duration policy, normalisation): ``(samples, rate)``."""
        try:
            from mmdata.transforms.audio import AudioConfig, decode_audio, process_audio
        except ImportError as exc:
            raise UserError(f"audio queries need the 'audio' extra (pip install 'mmdata[audio]'): {exc}") from None
        from mmdata.errors import SampleError, SampleFiltered

        try:
            data = read_bytes(path_or_url)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read query audio {path_or_url}: {exc}") from None
        cfg = AudioConfig(**((self.manifest.get("config") or {}).get("audio") or {}))
        try:
            samples, sr, _ = decode_audio(data, posixpath.splitext(path_or_url)[1])
        except SampleError as err:
            raise UserError(f"cannot decode query audio {path_or_url}: {err}") from None
        try:
            y, info = process_audio(samples, sr, cfg)
        except SampleFiltered as err:
            raise UserError(f"query audio {path_or_url} does not pass the build's audio settings ({err}); "
                            f"a clip like it would not have been indexed") from None
        return y, int(info["sample_rate"])

    def search_audio(self, path_or_url: str, k: int = 10, modality: str = "audio", model: Optional[str] = None) -> list[Hit]:
        """Audio file → similar sounds in the audio index, embedded with the build's audio encoder."""
        if modality != "audio":
            raise UserError(f"an audio query searches the audio index only, not {modality!r} (use --modality audio)")
        self.index(modality)
        encoder = self.audio_encoder(model)
        return self.search_embedding(encoder.encode_audio([self.audio_query(path_or_url)])[0], k, modality)

    def _record(self, key: str) -> dict:
        """The ids.parquet row of ``key`` (id, key, shard, row, caption)."""
        pos = self._ids.find_key(key)
        if pos is None:
            raise UserError(f"unknown key {key!r} in {self.out.url}")
        return self._ids.records([pos])[0]

    def embedding_of(self, key: str, modality: str = "image") -> np.ndarray:
        return self._embedding(self._record(key), modality)

    def _embedding(self, row: dict, modality: str) -> np.ndarray:
        key = row["key"]
        emb = np.load(io.BytesIO(self.out.read_bytes(f"embeddings/{modality}/{row['shard'][:-4]}.npy")))
        vec = emb[row["row"]].astype(np.float32)
        if not vec.any():  # the sample lacks this modality: a zero row, left out of the index
            raise UserError(f"sample {key!r} has no {modality} embedding (it has no {modality}); pick another --modality")
        return vec

    def search_key(self, key: str, k: int = 10, modality: str = "image") -> list[Hit]:
        """Neighbours of a stored sample, itself excluded."""
        self.index(modality)
        row = self._record(key)
        return self.search_embedding(self._embedding(row, modality), k, modality, exclude=row["id"])
