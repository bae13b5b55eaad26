"""``mmdata embed``: embed existing shards with another model, without rebuilding them.

Reads each shard's samples back from its tar (images decoded once, captions from ``.txt``) in an
engine task per unit (local processes, Dask or Beam, as ``build``), builds the indexes and the new
manifest, all staged under ``.mmdata-embed/<config hash>/``; then one atomic ``SWITCH.json`` and
the switch of ``embed_switch`` put them in place together. Killed at any point, the output holds
the old generation or the new one, and a re-run resumes: units already staged with the same
encoder facts are kept. Augmented views keep zero rows unless the build embedded them (``embed_views``).
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from PIL import Image, UnidentifiedImageError

from mmdata.config import BuildConfig
from mmdata.embed_switch import STAGING, SWITCH, finish_switch, pause
from mmdata.encoders.factory import check_models, make_encoder
from mmdata.encoders.setup_facts import (SETUP_FACTS, encoder_facts, facts_difference, fix_torch_threads, setup_facts,
                                         worker_setup_facts)
from mmdata.engines.base import get_engine
from mmdata.errors import UserError
from mmdata.layout import embedding_file, shard_files
from mmdata.pipeline.finalize import embeddings_facts
from mmdata.pipeline.plan import load_plan
from mmdata.pipeline.samples.embed import embed_samples
from mmdata.pipeline.samples.views import unembedded_view
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


@dataclass(frozen=True)
class EmbedTask:
    """One engine task: embed unit ``unit`` of the output ``out`` into the staging folder ``stage``."""

    out: str
    stage: str
    config: BuildConfig
    unit: str
    keep: tuple[str, ...] = ()  # modalities whose files are kept as they are (audio), copied into the stage


_ENCODERS: dict[str, Any] = {}


def _encoder(config: BuildConfig):
    key = f"{config.config_hash}:{config.device}:{config.torch_threads}"
    if key not in _ENCODERS:
        _ENCODERS.clear()
        _ENCODERS[key] = make_encoder(config)
    return _ENCODERS[key]


def unit_marker(stage: str, name: str) -> str:
    return f"{stage}/units/{name}.json"


def embed_unit(task: EmbedTask) -> dict:
    """Run on a worker: stage unit ``task.unit``'s new embedding files and a copy of its table (the
    index build reads it), then its marker, last. Idempotent: a unit staged with the same encoder
    facts is not embedded again (a retry, a resumed run)."""
    config, out = task.config, OutputDir(task.out)
    fix_torch_threads(config.torch_threads)
    marker = unit_marker(task.stage, task.unit)
    encoder = _encoder(config)
    facts = encoder_facts(encoder.info(), setup_facts(config))
    table = shard_files(task.unit)["parquet"]
    table_bytes = out.read_bytes(table)
    digest = hashlib.sha256(table_bytes).hexdigest()
    if out.exists(marker):
        staged = json.loads(out.read_bytes(marker))
        if staged.get("encoder") == facts and staged.get("table_sha256") == digest:  # same model, set-up, shard
            return staged
    samples = read_tar_samples(io.BytesIO(out.read_bytes(shard_files(task.unit)["tar"])))
    samples = [(k, {} if unembedded_view(m.get("json"), config) else m) for k, m in samples]  # views: zero rows
    images = [_image(m) if "image" in config.embed else None for _, m in samples]
    captions = [m["txt"].decode("utf-8") if "txt" in m else None for _, m in samples]
    for modality, rows in embed_samples(encoder, config, images, captions).items():
        out.write_bytes(f"{task.stage}/{embedding_file(modality, task.unit)}", npy_bytes(rows, config.embedding_dtype))
    for modality in task.keep:
        rows = np.load(io.BytesIO(out.read_bytes(embedding_file(modality, task.unit))), allow_pickle=False)
        out.write_bytes(f"{task.stage}/{embedding_file(modality, task.unit)}", npy_bytes(rows, config.embedding_dtype))
    out.write_bytes(f"{task.stage}/{table}", table_bytes)
    staged = {"unit": task.unit, "rows": len(samples), "encoder": facts, "table_sha256": digest}
    out.write_bytes(marker, json.dumps(staged, indent=1, sort_keys=True).encode())
    pause("unit")
    return staged


def _check_staged(config: BuildConfig, out: OutputDir, stage: str, names: list[str], engine) -> None:
    """Refuse, in one line, to resume a staging whose units ran with another set-up than this run's
    workers (unless ``reembed_mismatched``: those units are embedded again)."""
    staged = {n: json.loads(out.read_bytes(unit_marker(stage, n))) for n in names
              if out.exists(unit_marker(stage, n))}
    if not staged or config.reembed_mismatched:
        return
    setup = setup_facts(config) if config.engine == "local" else \
        engine.map_tasks(worker_setup_facts, [config], name="setup")[0]
    diffs = Counter(d for d in (facts_difference(s.get("encoder"), setup, SETUP_FACTS) for s in staged.values()) if d)
    if diffs:
        diff, _ = diffs.most_common(1)[0]
        n = sum(diffs.values())
        raise UserError(f"cannot resume mmdata embed: {n} of {len(staged)} staged units were embedded with another "
                        f"set-up ({diff}); resume with the set-up they used, or pass --reembed-mismatched to "
                        "re-embed them")


def reembed(out_url: str, on_shard: Callable[[str, int], None] = lambda name, n: None, **model: Any) -> dict:
    """Re-embed every shard of ``out_url`` with ``model`` settings (BuildConfig field names), on the
    configured engine; atomic and resumable (see the module docstring)."""
    out = OutputDir(out_url)
    if not out.exists("manifest.json") and not out.exists(STAGING):
        raise UserError(f"{out_url} is not a finished build (no manifest.json)")
    finish_switch(out)  # an earlier run killed during its switch: finish it first
    if not out.exists("manifest.json"):
        raise UserError(f"{out_url} is not a finished build (no manifest.json)")
    manifest = json.loads(out.read_bytes("manifest.json"))
    try:
        config = BuildConfig(**{**manifest["config"], "out": out_url, **{k: v for k, v in model.items() if v is not None}})
    except ValueError as exc:
        errors = getattr(exc, "errors", lambda: [])()
        why = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors) or str(exc).splitlines()[0]
        raise UserError(f"bad option: {why}") from None
    if not config.model:
        raise UserError("give --model (an open_clip model name)")
    if manifest["config"].get("embed_in_shards"):
        raise UserError(f"{out_url} was built with --embed-in-shards: its tars hold the old model's embeddings, "
                        "which mmdata embed does not rewrite; rebuild with --model … --overwrite")
    check_models(config)
    started = time.perf_counter()
    stage = f"{STAGING}/{config.config_hash}"
    for other in out.glob(f"{STAGING}/*"):  # stagings of other settings: never switched, useless now
        if other != stage:
            out.remove(other)
    units, _ = load_plan(out)
    names = [u.name for u in units]
    keep = tuple(m for m in ("audio",) if m in config.embedded_modalities)
    engine = get_engine(config)
    try:
        _check_staged(config, out, stage, names, engine)
        root = out.root if out.local else out.url  # absolute: workers may run elsewhere
        results = engine.map_tasks(embed_unit, [EmbedTask(root, stage, config, n, keep) for n in names], name="embed")
        for r in results:
            on_shard(r["unit"], r["rows"])
        facts = results[0]["encoder"] if results else None
        for r in results:
            if r["encoder"] != facts:
                raise UserError(f"units were embedded with different models or set-ups "
                                f"({facts_difference(facts, r['encoder'])}): the workers differ; run again on one kind")
        new = dict(manifest)
        new["config"] = config.model_dump(mode="json")
        new["config_hash"] = config.config_hash
        stats = {"encoder": facts}
        if (manifest.get("embeddings") or {}).get("audio_encoder"):  # audio embeddings are kept: so are their facts
            stats["audio_encoder"] = manifest["embeddings"]["audio_encoder"]
        new["embeddings"] = embeddings_facts(config, [stats])
        new.setdefault("timings", {})["embed_seconds"] = round(time.perf_counter() - started, 3)
        new.pop("index", None)
        staged = OutputDir(out.url.rstrip("/") + "/" + stage)
        staged.remove("index")  # a half-built index of a killed run
        if config.index:  # built in the stage (its copies of the tables and the new embeddings)
            from mmdata.index.step import build_indexes

            infos = build_indexes(config, staged, units, engine)
            new["index"] = {m: {k: i.get(k) for k in ("index_key", "n", "recall_at_10")} for m, i in infos.items()}
    finally:
        engine.close()
    staged.write_bytes("manifest.json", json.dumps(new, indent=1, sort_keys=True).encode())
    staged.remove("shards")  # the copied tables served the index build; the switch needs none of them
    switch = {"config_hash": config.config_hash, "index": bool(config.index), "encoder": facts,
              "modalities": config.embedded_modalities, "dtype": config.embedding_dtype,
              "units": {r["unit"]: r["rows"] for r in results}}
    staged.write_bytes(SWITCH, json.dumps(switch, indent=1, sort_keys=True).encode())  # the commit point
    pause("commit")
    finish_switch(out)
    return new
