"""``mmdata embed``: embed existing shards with another model, without rebuilding them.

Reads each shard's samples back from its tar (images decoded once, captions from ``.txt``),
writes ``embeddings/<modality>/<shard>.npy`` atomically, rebuilds the indexes and records the
new model in manifest.json. Augmented views keep zero rows unless the build embedded them (``embed_views``).
"""
from __future__ import annotations

import io
import json
import time
from typing import Any, Callable, Optional

from PIL import Image, UnidentifiedImageError

from mmdata.config import BuildConfig
from mmdata.encoders.factory import make_encoder
from mmdata.errors import UserError
from mmdata.layout import embedding_file, shard_files
from mmdata.pipeline.finalize import embeddings_facts
from mmdata.pipeline.plan import load_plan
from mmdata.pipeline.samples.embed import embed_samples
from mmdata.pipeline.samples.views import unembedded_view
from mmdata.pipeline.unit import ENCODER_FACTS
from mmdata.storage import OutputDir
from mmdata.transforms.image import to_rgb
from mmdata.writers.npy import npy_bytes
from mmdata.writers.tar import read_tar_samples

IMAGE_MEMBERS = ("jpg", "png", "webp")


def _image(members: dict[str, bytes]) -> Optional[Image.Image]:
    for ext in IMAGE_MEMBERS:
        if ext in members:
            try:
                im = Image.open(io.BytesIO(members[ext]))
                im.load()
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
                raise UserError(f"shard member {ext} cannot be decoded ({exc}); run mmdata verify") from None
            return to_rgb(im)
    return None


def reembed(out_url: str, on_shard: Callable[[str, int], None] = lambda name, n: None, **model: Any) -> dict:
    """Re-embed every shard of ``out_url`` with ``model`` settings (BuildConfig field names)."""
    out = OutputDir(out_url)
    if not out.exists("manifest.json"):
        raise UserError(f"{out_url} is not a finished build (no manifest.json)")
    manifest = json.loads(out.read_bytes("manifest.json"))
    try:
        config = BuildConfig(**{**manifest["config"], **{k: v for k, v in model.items() if v is not None}})
    except ValueError as exc:
        raise UserError(f"bad option: {str(exc).splitlines()[0]}") from None
    if not config.model:
        raise UserError("give --model (an open_clip model name)")
    if manifest["config"].get("embed_in_shards"):
        raise UserError(f"{out_url} was built with --embed-in-shards: its tars hold the old model's embeddings, "
                        "which mmdata embed does not rewrite; rebuild with --model … --overwrite")
    started = time.perf_counter()
    encoder = make_encoder(config)
    units, _ = load_plan(out)
    for modality in ("image", "text", "fused"):
        out.remove(f"embeddings/{modality}")
    for unit in units:
        samples = read_tar_samples(io.BytesIO(out.read_bytes(shard_files(unit.name)["tar"])))
        samples = [(k, {} if unembedded_view(m.get("json"), config) else m) for k, m in samples]  # views: zero rows
        images = [_image(m) if "image" in config.embed else None for _, m in samples]
        captions = [m["txt"].decode("utf-8") if "txt" in m else None for _, m in samples]
        for modality, rows in embed_samples(encoder, config, images, captions).items():
            out.write_bytes(embedding_file(modality, unit.name), npy_bytes(rows, config.embedding_dtype))
        on_shard(unit.name, len(samples))
    facts = {k: v for k, v in encoder.info().items() if k in ENCODER_FACTS}
    manifest["config"] = config.model_dump(mode="json")
    stats = {"encoder": facts}
    if (manifest.get("embeddings") or {}).get("audio_encoder"):  # audio embeddings are kept: so are their facts
        stats["audio_encoder"] = manifest["embeddings"]["audio_encoder"]
    manifest["embeddings"] = embeddings_facts(config, [stats])
    manifest.setdefault("timings", {})["embed_seconds"] = round(time.perf_counter() - started, 3)
    out.remove("index")  # the old indexes belong to the old model (with --no-index: no index at all)
    manifest.pop("index", None)
    if config.index:
        from mmdata.index.step import build_indexes

        infos = build_indexes(config, out, units)
        manifest["index"] = {m: {k: i.get(k) for k in ("index_key", "n", "recall_at_10")} for m, i in infos.items()}
    out.write_bytes("manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest
