"""run_unit: the one function engines schedule. Unit *i* in, shard *i* and its sidecars out.

Outputs are committed in order — tar, offsets, parquet, embeddings together (each fsynced, renamed,
their folders fsynced once), then ``_stats.json`` last — each atomically. A unit
is committed when its stats file exists with this config's hash; re-running it is then a no-op.
Per-process state (transforms, tokenizer, models) is built once and cached by config hash.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from typing import TYPE_CHECKING, Iterator, Optional, Union

from mmdata.config import BuildConfig
from mmdata.encoders.factory import audio_encoder_facts, make_audio_encoder, make_encoder
from mmdata.encoders.setup_facts import ENCODER_FACTS  # noqa: F401  (what identifies the model: re-exported)
from mmdata.encoders.setup_facts import SETUP_FACTS, encoder_facts, facts_difference, fix_torch_threads, setup_facts
from mmdata.keys import key_to_id, sanitize_key
from mmdata.layout import embedding_file, offsets_file, shard_files
from mmdata.pipeline.plan import load_unit, records_table, table_digest, unit_ref
from mmdata.pipeline.samples.embed import AudioEmbedder, ImageEmbedder, embed_samples
from mmdata.pipeline.samples.record import RecordProcessor
from mmdata.pipeline.samples.sample import Sample, Timer, write_json
from mmdata.pipeline.samples.views import ViewMaker, embeds, is_view, rekey_views
from mmdata.records import Record, Unit, UnitRef
from mmdata.schema import SHARD_SCHEMA
from mmdata.sources import is_url
from mmdata.storage import OutputDir
from mmdata.transforms.tokenize import get_tokenizer, tokenize_npy
from mmdata.version import __version__
from mmdata.writers.npy import npy_bytes
from mmdata.writers.offsets import offsets_bytes
from mmdata.writers.table import table_bytes
from mmdata.writers.tar import write_tar

if TYPE_CHECKING:  # imported where a unit downloads: httpx costs a worker ~0.1 s to import
    from mmdata.sources.http import Downloader, DownloadOptions

_CONTEXTS: dict[str, "UnitContext"] = {}


class UnitContext:
    """What a worker process builds once per configuration."""

    def __init__(self, config: BuildConfig):
        self.config = config
        self.out = OutputDir(config.out)
        self.processor = RecordProcessor(config)
        self.views = ViewMaker(config) if config.n_views else None
        self.tokenizer = get_tokenizer(config.tokenizer) if config.tokenize else None
        self.setup = setup_facts(config) if uses_torch_encoder(config) else {}  # device kind, precision, threads
        if self.setup:
            fix_torch_threads(config.torch_threads)
        self.encoder = make_encoder(config) if config.model else None
        self.audio_encoder = make_audio_encoder(config)
        self._downloader: Optional[Downloader] = None

    @property
    def downloader(self) -> Downloader:
        """The process's download client, built for the first unit with http(s) sources."""
        if self._downloader is None:
            from mmdata.sources.http import Downloader

            self._downloader = Downloader(download_options(self.config))
        return self._downloader


# Source slots a unit downloads when they hold http(s) URLs (a manifest's --audio-col among them).
DOWNLOADED_SLOTS = ("audio", "image", "text", "json")


def download_options(config: BuildConfig) -> DownloadOptions:
    """The client's options (``per_domain_rps`` holds for the whole machine: its processes share it)."""
    from mmdata.sources.http import DownloadOptions

    return DownloadOptions(
        threads=config.download_threads, max_bytes=config.max_download_bytes, connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout, total_timeout=config.download_timeout, retries=config.download_retries,
        retry_after_max=config.retry_after_max, max_redirects=config.max_redirects, user_agent=config.user_agent,
        contact_url=config.contact_url, per_domain_connections=config.per_domain_connections, per_domain_rps=config.per_domain_rps,
        allow_private_addresses=config.allow_private_addresses, optout_directives=tuple(config.optout_directives),
        respect_robots_txt=config.respect_robots_txt)


def _urls(record: Record) -> list[tuple[str, str]]:
    if record.problem:
        return []  # it fails or is filtered on its planning problem, unread
    return [(url, slot) for slot, url in sorted(record.sources.items()) if slot in DOWNLOADED_SLOTS and is_url(url)]


def unit_downloads(ctx: UnitContext, records: list[Record], tally: dict | None = None) -> Iterator[dict]:
    """For each record in order, its http(s) sources downloaded (URL → ``Fetched``): the unit's URLs
    are fetched concurrently, a bounded window ahead of the record being processed. ``tally`` gets the
    unit's download statistics (:func:`download_stats`)."""
    wanted = [item for r in records for item in _urls(r)]
    fetched = ctx.downloader.fetch_many(wanted) if wanted else iter(())
    for r in records:
        got = {url: next(fetched) for url, _ in _urls(r)}
        if tally is not None:
            add_download_stats(tally, got.values())
        yield got


def add_download_stats(tally: dict, fetched) -> None:
    """Adds URLs' downloads to a unit's ``downloads`` statistics: URLs, HTTP requests, retries, body
    bytes received, seconds (summed over URLs: downloads overlap, so more than the wall time) and
    the URLs per outcome (``ok`` or the download's reason)."""
    for f in fetched:
        tally["urls"] = tally.get("urls", 0) + 1
        tally["requests"] = tally.get("requests", 0) + f.requests
        tally["retries"] = tally.get("retries", 0) + max(0, f.attempts - 1)
        tally["bytes"] = tally.get("bytes", 0) + f.bytes
        tally["seconds"] = tally.get("seconds", 0.0) + f.seconds
        outcome = "ok" if f.error is None else f.error.reason
        tally.setdefault("outcomes", {})[outcome] = tally.get("outcomes", {}).get(outcome, 0) + 1


def uses_torch_encoder(config: BuildConfig) -> bool:
    return bool(config.model) or config.audio_encoder == "clap"


def unit_facts(stats: dict) -> dict:
    """The encoder facts a committed unit recorded: open_clip's, else CLAP's (none for mel-stats)."""
    return stats.get("encoder") or stats.get("audio_encoder") or {}


def setup_mismatch(config: BuildConfig, stats: dict, setup: dict) -> Optional[str]:
    """``device: cuda → cpu`` when a committed unit's encoder ran with another set-up than ``setup``."""
    if not uses_torch_encoder(config):
        return None
    return facts_difference(unit_facts(stats), setup, SETUP_FACTS)


def get_context(config: BuildConfig) -> UnitContext:
    key = f"{config.config_hash}:{config.out}:{config.device}:{config.torch_threads}"  # runtime fields a context holds
    if key not in _CONTEXTS:
        _CONTEXTS[key] = UnitContext(config)
    return _CONTEXTS[key]


def plan_digest(unit: Union[Unit, UnitRef]) -> str:
    """A digest of the unit's records as planned (keys, ids, sources, inline captions and metadata):
    a committed shard counts only for the plan it was built from, so a resume never mixes plans.
    A planned unit (UnitRef) carries the digest the plan stored; records are hashed as plan rows."""
    if isinstance(unit, UnitRef):
        return unit.digest
    return table_digest(records_table(unit.records, unit.index))


def read_committed(out: OutputDir, name: str, config_hash: str, modalities: list[str] = (),
                   digest: Optional[str] = None) -> Optional[dict]:
    """The unit's stats if it is committed under ``config_hash`` (and, given ``digest``, from the
    same plan: ``plan_digest``), else None."""
    files = {**shard_files(name), **{m: embedding_file(m, name) for m in modalities}}
    if not out.exists(files["stats"]):
        return None
    try:
        stats = json.loads(out.read_bytes(files["stats"]))
    except (OSError, ValueError):
        return None
    if digest is not None and stats.get("plan_digest") != digest:
        return None  # built from another plan (plan.parquet deleted, corpus changed): rebuild it
    if stats.get("config_hash") != config_hash or not all(out.exists(f) for k, f in files.items() if k != "stats"):
        return None
    return stats


def run_unit(config: BuildConfig, unit: Union[int, UnitRef, Unit]) -> dict:
    """Build shard ``unit.index`` (unless committed) and return its stats. Engines pass a unit's index
    (or its UnitRef): its records are read here, from its own row group of the output's plan."""
    ctx = get_context(config)
    if isinstance(unit, int):
        unit = unit_ref(ctx.out, int(unit))
    digest = plan_digest(unit)
    files = shard_files(unit.name)
    committed = read_committed(ctx.out, unit.name, config.config_hash, config.embedded_modalities, digest)
    if committed is not None and not setup_mismatch(config, committed, ctx.setup):
        return {**committed, "skipped": True}
    if isinstance(unit, UnitRef):
        unit, digest = load_unit(ctx.out, unit.index)
    started = time.time()
    timer = Timer()
    audio_embedder = AudioEmbedder(ctx.audio_encoder, config.embed_batch_size) if ctx.audio_encoder else None
    image_embedder = (ImageEmbedder(ctx.encoder, config.embed_batch_size)
                      if ctx.encoder is not None and "image" in config.embed else None)
    try:
        return _run(ctx, config, unit, files, timer, started, audio_embedder, image_embedder, digest)
    finally:
        if image_embedder is not None:
            image_embedder.close()


def _run(ctx: UnitContext, config: BuildConfig, unit: Unit, files: dict, timer: Timer, started: float,
         audio_embedder: Optional[AudioEmbedder], image_embedder: Optional[ImageEmbedder], digest: str) -> dict:
    samples: list[Sample] = []
    download_tally: dict = {}
    downloads = unit_downloads(ctx, unit.records, download_tally)
    for record in unit.records:
        t0 = time.perf_counter()
        fetched = next(downloads)
        if fetched:
            timer.add("download", t0)  # waiting for the record's downloads (they run ahead, in threads)
        produced = ctx.processor(record, timer, fetched)  # one sample, or one per transcript segment
        if ctx.views is not None:
            produced = ctx.views(produced, timer)  # each written sample followed by its views
        if audio_embedder is not None:
            for s in produced:
                audio_embedder.add(s, timer)
        if image_embedder is not None:  # embedded in the background while the next records decode
            for s in produced:
                if s.row["status"] == "written" and embeds(s, config):
                    image_embedder.add(s)
        samples.extend(produced)
    samples = in_key_order(samples)
    written = [s for s in samples if s.row["status"] == "written"]
    if ctx.tokenizer is not None:
        t0 = time.perf_counter()
        with_text = [s for s in written if s.caption is not None]
        for s, blob in zip(with_text, tokenize_npy(ctx.tokenizer, [s.caption for s in with_text])):
            s.members["tokens.npy"] = blob
        timer.add("tokenize", t0)
    for row, s in enumerate(written):
        s.row["row"] = row
    embeddings = {}
    if ctx.encoder is not None:
        t0 = time.perf_counter()
        embedded = [embeds(s, config) for s in written]  # views: zero rows unless embed_views
        image_rows = image_embedder.rows(written, timer) if image_embedder is not None else None
        embeddings = embed_samples(ctx.encoder, config, [None] * len(written),
                                   [s.caption if e else None for s, e in zip(written, embedded)], image_rows=image_rows)
        for s in written:
            s.image = None
        if config.embed_in_shards:
            for modality, rows in embeddings.items():
                for s, vec in zip(written, rows):
                    s.members[f"{modality}_emb.npy"] = npy_bytes(vec, config.embedding_dtype)
        timer.add("embed", t0)
    if audio_embedder is not None:
        embeddings["audio"] = audio_embedder.rows(written, timer)
        if config.embed_in_shards:
            for s, vec in zip(written, embeddings["audio"]):
                s.members["audio_emb.npy"] = npy_bytes(vec, config.embedding_dtype)
    t0 = time.perf_counter()
    offsets: list = []
    with ctx.out.atomic_group() as group:  # renamed together, one folder fsync, before the commit marker
        with group.open(files["tar"]) as fh:
            write_tar(fh, ((s.row["key"], s.members) for s in written), offsets)
            tar_bytes = fh.tell()
        group.write_bytes(offsets_file(unit.name), offsets_bytes(offsets, tar_bytes))
        group.write_bytes(files["parquet"], table_bytes([s.row for s in samples], SHARD_SCHEMA))
        for modality, rows in embeddings.items():
            group.write_bytes(embedding_file(modality, unit.name), npy_bytes(rows, config.embedding_dtype))
    timer.add("write", t0)
    stats = unit_stats(unit, config, samples, timer, started, tar_bytes, digest)
    if download_tally:
        stats["downloads"] = {**download_tally, "seconds": round(download_tally["seconds"], 4),
                              "outcomes": dict(sorted(download_tally["outcomes"].items()))}
    if ctx.encoder is not None:
        stats["encoder"] = encoder_facts(ctx.encoder.info(), ctx.setup)
    if ctx.audio_encoder is not None:
        stats["audio_encoder"] = audio_encoder_facts(ctx.audio_encoder)
        if config.audio_encoder == "clap":
            stats["audio_encoder"].update(ctx.setup)
    if embeddings:
        stats["embeddings"] = {m: {"rows": len(written), "dtype": config.embedding_dtype} for m in embeddings}
    # the commit marker: fsynced, renamed; its folder is fsynced by finalize before the manifest (a
    # marker lost in a crash before then only means the unit is built again)
    ctx.out.write_bytes(files["stats"], json.dumps(stats, indent=1, sort_keys=True).encode(), sync_folder=False)
    return stats


def in_key_order(samples: list[Sample]) -> list[Sample]:
    """The unit's samples sorted by key (segments sit among the records). A segment key that
    equals another sample's key (a file literally named ``cat_s0001`` beside ``cat.wav`` + ``cat.srt``)
    gets a suffix hashed from its parent's key. Augmented views then follow their parents' keys."""
    views = [s for s in samples if is_view(s)]
    samples = sorted((s for s in samples if not is_view(s)), key=lambda s: s.row["key"])
    seen = Counter(s.row["key"] for s in samples)
    for s in samples:  # a key another record of the plan holds, in this unit or any other
        if s.row.get("parent_key") and (seen[s.row["key"]] > 1 or s.row["key"] in s.record.reserved):
            seen[s.row["key"]] -= 1
            key = sanitize_key(f"{s.row['key']}_{hashlib.blake2b(s.row['parent_key'].encode(), digest_size=4).hexdigest()}")
            s.row.update(key=key, id=key_to_id(key))
            if "json" in s.members:
                write_json(s)
    rekey_views(views, {s.row["key"] for s in samples} | {k for s in samples for k in s.record.reserved})
    return sorted(samples + views, key=lambda s: s.row["key"])


def unit_stats(unit: Unit, config: BuildConfig, samples: list[Sample], timer: Timer, started: float, tar_bytes: int,
               digest: Optional[str] = None) -> dict:
    status = Counter(s.row["status"] for s in samples)
    audio = [s.row["duration"] for s in samples if s.row["status"] == "written" and s.row.get("duration") is not None]
    reasons: dict[str, Counter] = {"filtered": Counter(), "failed": Counter()}
    for s in samples:
        if s.row["status"] in reasons:
            reasons[s.row["status"]][s.row["reason"]] += 1
    return {
        "unit": unit.index,
        "shard": f"{unit.name}.tar",
        "config_hash": config.config_hash,
        "plan_digest": digest or plan_digest(unit),
        "mmdata_version": __version__,
        "counts": {
            "records": len(unit.records),
            "inputs": len(samples),
            "written": status["written"],
            "filtered": status["filtered"],
            "failed": status["failed"],
        },
        "reasons": {k: dict(sorted(v.items())) for k, v in reasons.items()},
        "audio": {"samples": len(audio), "seconds": round(sum(audio), 3)},
        "tar_bytes": tar_bytes,
        "seconds": {k: round(v, 4) for k, v in sorted(timer.seconds.items())},
        "wall_seconds": round(time.time() - started, 4),
    }
