"""Per-shard measures, one engine task per input shard: perceptual hash of the image member,
normalised caption hash, language, word and token counts, audio speech ratio, loudness and clipping.

A task reads one input shard (tar + parquet) and writes ``<scratch>/features/<shard>.parquet``, one
row per written sample (``pos``: its row in the input parquet). A sample whose member cannot be
decoded gets ``error`` and ends ``failed`` in the curated table.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa

from mmdata.arrow import parquet_table
from mmdata.curate import audio as audio_measures
from mmdata.curate import text as text_measures
from mmdata.curate.markers import mark_done
from mmdata.storage import OutputDir
from mmdata.writers.table import table_bytes

IMAGE_MEMBERS = ("jpg", "png", "webp")
FEATURES_SCHEMA = pa.schema([
    pa.field("pos", pa.int32(), nullable=False),
    pa.field("phash", pa.int64()),
    pa.field("caption_hash", pa.string()),
    pa.field("language", pa.string()),
    pa.field("language_score", pa.float32()),
    pa.field("words", pa.int32()),
    pa.field("tokens", pa.int32()),
    pa.field("speech_ratio", pa.float32()),
    pa.field("loudness", pa.float32()),
    pa.field("clipping", pa.float32()),
    pa.field("audio_member_sha256", pa.string()),
    pa.field("error", pa.string()),
])


@dataclass
class FeatureTask:
    """Measure the written samples of input shard ``name`` of the build at ``build``."""

    build: str
    out: str
    folder: str
    name: str
    phash: bool
    language: bool
    tokenizer: Optional[str]
    audio: bool
    speech: bool
    exact: tuple[str, ...] = ()  # modalities whose exact-dedup digests go to <folder>/exact/<modality>/<name>.npy
    buckets: int = 1  # hash buckets of the exact-dedup tasks


def read_members(data: bytes, keys: set[str] | None = None) -> dict[str, dict[str, bytes]]:
    """``{key: {ext: bytes}}`` of a shard that mmdata wrote (member ``{key}.{ext}``, keys without dots,
    as webdataset splits them), read with ``tarfile`` alone: workers need not import webdataset (and torch)."""
    import tarfile

    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            if info.isfile():
                key, _, ext = info.name.rpartition("/")[2].partition(".")
                if keys is not None and key not in keys:  # only the samples asked for are read
                    continue
                samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return samples


def phash64(data: bytes) -> int:
    """The 64-bit DCT perceptual hash (imagehash.phash, 8x8) of an encoded image, as a signed int64."""
    import imagehash
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        bits = imagehash.phash(img, hash_size=8).hash.flatten()
    value = int("".join("1" if b else "0" for b in bits), 2)
    return value - (1 << 64) if value >= 1 << 63 else value


def run_feature_task(task: FeatureTask) -> dict:
    """Write the shard's features parquet (idempotent: same shard → same bytes); return its row count."""
    build, out = OutputDir(task.build), OutputDir(task.out)
    table = parquet_table(build.read_bytes(f"shards/{task.name}.parquet"),
                          columns=["key", "status", "caption", "image_format", "audio_sha256", "image_sha256", "parent_key"],
                          use_threads=False).to_pylist()
    written = [r for r in table if r["status"] == "written"]
    needs_members = ((task.phash and any(r["image_format"] for r in written))
                     or (task.audio and any(r["audio_sha256"] for r in written)))
    members = read_members(build.read_bytes(f"shards/{task.name}.tar")) if needs_members else {}
    rows = []
    for pos, r in enumerate(table):
        if r["status"] != "written":
            continue
        row: dict = {"pos": pos}
        sample = members.get(r["key"], {})
        caption = r["caption"]
        try:
            if caption is not None:
                row["caption_hash"] = text_measures.caption_hash(caption)
                row["words"] = text_measures.word_count(caption)
                if task.language:
                    row["language"], row["language_score"] = text_measures.language(caption)
            image = next((sample[e] for e in IMAGE_MEMBERS if e in sample), None)
            if task.phash and image is not None:
                row["phash"] = phash64(image)
            if task.audio and "flac" in sample:
                row["audio_member_sha256"] = hashlib.sha256(sample["flac"]).hexdigest()
                row.update(audio_measures.audio_measures(sample["flac"], task.speech))
        except (OSError, ValueError, RuntimeError) as exc:  # an undecodable member: this sample fails
            row = {"pos": pos, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]}
        rows.append(row)
    if task.tokenizer:
        with_text = [(row, table[row["pos"]]["caption"]) for row in rows if table[row["pos"]]["caption"] is not None
                     and not row.get("error")]
        for (row, _), n in zip(with_text, text_measures.token_counts(task.tokenizer, [c for _, c in with_text])):
            row["tokens"] = n
    out.write_bytes(f"{task.folder}/features/{task.name}.parquet", table_bytes(rows, FEATURES_SCHEMA))
    _write_exact(out, task, table, rows)
    mark_done(out, task.folder, "measure", task.name, {"rows": len(rows)})
    return {"shard": task.name, "rows": len(rows)}


def _write_exact(out: OutputDir, task: FeatureTask, table: list[dict], rows: list[dict]) -> None:
    """The exact-dedup digests of the shard's measured samples, per modality (``mmdata.curate.exact``):
    image: the source bytes' sha256; text: the normalised caption's; audio: the source's, or for a
    segment of a recording (which shares the recording's audio_sha256) its own member's."""
    from mmdata.curate.exact import digest_rows
    from mmdata.curate.vectors import save_npy

    ok = [row for row in rows if not row.get("error")]
    for modality in task.exact:
        if modality == "image":
            values = [table[row["pos"]]["image_sha256"] for row in ok]
        elif modality == "text":
            values = [row.get("caption_hash") for row in ok]
        else:
            values = [row.get("audio_member_sha256") if table[row["pos"]]["parent_key"] is not None
                      else table[row["pos"]]["audio_sha256"] for row in ok]
        save_npy(out, f"{task.folder}/exact/{modality}/{task.name}.npy",
                 digest_rows([row["pos"] for row in ok], values, task.buckets))


def load_features(out: OutputDir, folder: str, name: str) -> pa.Table:
    return parquet_table(out.read_bytes(f"{folder}/features/{name}.parquet"), use_threads=False)


def phash_bytes(values: np.ndarray) -> np.ndarray:
    """int64 hashes as the (n, 8) uint8 codes a FAISS binary index takes (big-endian bit order)."""
    return np.asarray(values, dtype=">i8").view(np.uint8).reshape(-1, 8)
