"""The ``mmdata`` command line. Every problem the user must fix prints one line and exits 2."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from mmdata.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn raw multimodal corpora into training-ready WebDataset shards, metadata, embeddings and indexes.")


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def build(
    input: Optional[str] = typer.Option(None, "--input", "-i", help="folder or manifest (.parquet/.csv/.tsv/.jsonl); any fsspec URL"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="output folder; any fsspec URL"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file with any of these options"),
    engine: Optional[str] = typer.Option(None, help="local (default), dask or beam"),
    workers: Optional[int] = typer.Option(None, help="worker processes (default: cores)"),
    dask_address: Optional[str] = typer.Option(None, help="--engine dask: scheduler address tcp://host:8786 (default: a LocalCluster of --workers)"),
    dask_gpu_resource: Optional[str] = typer.Option(None, help="--engine dask: worker resource each unit holds, e.g. GPU"),
    dask_retries: Optional[int] = typer.Option(None, help="--engine dask: retries of a unit that raised (default 3)"),
    beam_options: Optional[List[str]] = typer.Option(None, "--beam-option", help="--engine beam: a pipeline option KEY=VALUE (repeatable), e.g. runner=FlinkRunner"),
    samples_per_shard: Optional[int] = typer.Option(None, help="records per work unit / shard (default 1000)"),
    image_size: Optional[int] = typer.Option(None, help="target size in pixels (default 256)"),
    resize_mode: Optional[str] = typer.Option(None, help="no | keep_ratio | center_crop | border"),
    resize_only_if_bigger: Optional[bool] = typer.Option(None, "--resize-only-if-bigger/--resize-always"),
    image_format: Optional[str] = typer.Option(None, help="jpg | png | webp"),
    image_quality: Optional[int] = typer.Option(None, help="jpg/webp quality 1-100 (default 95)"),
    min_image_size: Optional[int] = typer.Option(None, help="filter images whose smaller side is below this"),
    max_aspect_ratio: Optional[float] = typer.Option(None, help="filter images more elongated than this"),
    max_pixels: Optional[int] = typer.Option(None, help="filter images whose header claims more pixels"),
    require: Optional[str] = typer.Option(None, help="comma-separated modalities a record must have (default image,text)"),
    image_col: Optional[str] = typer.Option(None, help="manifest column with image paths/URLs (default image)"),
    text_col: Optional[str] = typer.Option(None, help="manifest column with captions (default caption)"),
    key_col: Optional[str] = typer.Option(None, help="manifest column with sample keys (default: from the image path)"),
    tokenize: Optional[bool] = typer.Option(None, "--tokenize/--no-tokenize", help="write {key}.tokens.npy"),
    tokenizer: Optional[str] = typer.Option(None, help="open_clip model whose tokenizer to use (default ViT-B-32)"),
    sample_rate: Optional[int] = typer.Option(None, help="audio: sample rate of {key}.flac in Hz (default 16000)"),
    mono: Optional[bool] = typer.Option(None, "--mono/--keep-channels", help="audio: downmix to mono (default) or keep the channels"),
    normalize: Optional[str] = typer.Option(None, help="audio: none (default) | peak | loudness"),
    trim_silence: Optional[bool] = typer.Option(None, "--trim-silence/--no-trim-silence", help="audio: cut leading and trailing silence"),
    min_duration: Optional[float] = typer.Option(None, help="audio: filter clips shorter than this (seconds)"),
    max_duration: Optional[float] = typer.Option(None, help="audio: clips longer than this are cut or filtered (--long-clips)"),
    long_clips: Optional[str] = typer.Option(None, help="audio: filter (default) | cut clips over --max-duration"),
    mel: Optional[bool] = typer.Option(None, "--mel/--no-mel", help="audio: also write {key}.mel.npy (float16 log-mel)"),
    segment_pad: Optional[float] = typer.Option(None, help="transcripts: seconds of audio kept around each segment (default 0)"),
    segment_offset: Optional[float] = typer.Option(None, help="transcripts: seconds added to every transcript time (default 0)"),
    min_segment: Optional[float] = typer.Option(None, help="transcripts: merge shorter segments with a neighbour (seconds)"),
    max_segment: Optional[float] = typer.Option(None, help="transcripts: split longer segments at a pause (seconds)"),
    max_merge_gap: Optional[float] = typer.Option(None, help="transcripts: largest gap a merge spans (seconds, default 1)"),
    augment: Optional[str] = typer.Option(None, "--augment", help="augmentation config (YAML): write seeded views <key>_v01 … of every written sample"),
    views: Optional[int] = typer.Option(None, "--views", help="--augment: views per sample (default: the config's views)"),
    augment_seed: Optional[int] = typer.Option(None, "--seed", help="--augment: seed of the views (default: the config's seed)"),
    keep_originals: Optional[bool] = typer.Option(None, "--keep-originals/--drop-originals", help="--augment: also write the originals (default) or only their views"),
    embed_views: Optional[bool] = typer.Option(None, "--embed-views", help="--augment: embed and index the views too (default: zero rows)"),
    model: Optional[str] = typer.Option(None, help="open_clip model to embed images/text with, e.g. ViT-B-32 (default: no embeddings)"),
    pretrained: Optional[str] = typer.Option(None, help="open_clip tag (laion2b_s34b_b79k) or a local checkpoint path"),
    embed: Optional[str] = typer.Option(None, help="modalities to embed (default image,text)"),
    precision: Optional[str] = typer.Option(None, help="fp32 | fp16 | bf16 (autocast on GPU)"),
    device: Optional[str] = typer.Option(None, help="auto (CUDA when present) | cpu | cuda | cuda:N"),
    embed_batch_size: Optional[int] = typer.Option(None, help="encoder batch size (halved on CUDA out-of-memory)"),
    embedding_dtype: Optional[str] = typer.Option(None, help="float16 (default) | float32"),
    embed_in_shards: Optional[bool] = typer.Option(None, "--embed-in-shards", help="also store {key}.<modality>_emb.npy in the samples"),
    fused: Optional[str] = typer.Option(None, help="'mean': also a fused embedding and index"),
    audio_encoder: Optional[str] = typer.Option(None, help="audio embeddings: mel-stats | clap (default: none)"),
    clap_model: Optional[str] = typer.Option(None, help="CLAP hub id or local folder (default laion/clap-htsat-unfused)"),
    index: Optional[bool] = typer.Option(None, "--index/--no-index", help="build FAISS indexes at finalize (default on)"),
    index_memory_gb: Optional[float] = typer.Option(None, "--index-memory", help="memory budget of each index in GB (default 4)"),
    index_key: Optional[str] = typer.Option(None, help="force the faiss index type, e.g. IVF1024,Flat | OPQ16,IVF256,PQ16 | HNSW32 (default: chosen by size and --index-memory)"),
    index_distributed: Optional[str] = typer.Option(None, help="auto (default: on for IVF indexes with --engine dask/beam) | on | off: add embeddings to the index on the engine"),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="rebuild from scratch instead of resuming"),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress"),
) -> None:
    """Build WebDataset shards (and their tables) from a corpus."""
    from mmdata.build import build as run_build
    from mmdata.config import load_config

    beam_options = beam_options or None  # no flag: keep the config file's
    overrides = {k: v for k, v in locals().items() if k not in ("config", "run_build", "load_config")}
    try:
        cfg = load_config(str(config) if config else None, **overrides)
        manifest = run_build(cfg)
    except UserError as err:
        fail(str(err))
    print_summary(manifest, cfg.out)


def print_summary(manifest: dict, out: str) -> None:
    c = manifest["counts"]
    records = manifest.get("records", c["inputs"])  # rows outnumber records with segments and views
    rows = f"{records} records" if records == c["inputs"] else f"{records} records, {c['inputs']} rows"
    typer.echo(f"{rows}: {c['written']} written, {c['filtered']} filtered, {c['failed']} failed "
               f"in {manifest['timings']['wall_seconds']:.1f} s ({manifest['timings']['samples_per_second']:.1f} samples/s)")
    for status in ("filtered", "failed"):
        for reason, n in sorted(manifest["reasons"][status].items(), key=lambda kv: -kv[1]):
            typer.echo(f"  {status:8s} {n:6d}  {reason}")
    typer.echo(f"output: {out}  ({manifest['units']} shards in {out.rstrip('/')}/shards)")


@app.command()
def inspect(shard: str = typer.Argument(..., help="a .tar shard (any fsspec URL)"),
            as_json: bool = typer.Option(False, "--json", help="one JSON object per sample")) -> None:
    """List the samples of a shard and their members."""
    from mmdata.inspect_shard import describe_shard

    import tarfile

    try:
        samples = describe_shard(shard)
    except tarfile.TarError:
        fail(f"{shard} is not a readable tar file")
    except (OSError, EOFError) as exc:
        fail(f"cannot read {shard}: {exc}")
    for s in samples:
        if as_json:
            typer.echo(json.dumps(s))
        else:
            typer.echo(f"{s['key']}  " + "  ".join(f"{ext}:{size}" for ext, size in sorted(s["members"].items())))
    if not as_json:
        typer.echo(f"{len(samples)} samples")


@app.command()
def verify(out: str = typer.Argument(..., help="a build's output folder")) -> None:
    """Re-read every shard; check counts against sizes.json and the tables. Exit 1 on any mismatch."""
    from mmdata.verify import verify_output

    problems = verify_output(out)
    for p in problems:
        typer.echo(f"MISMATCH {p}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{out}: ok")


@app.command()
def embed(
    out: str = typer.Argument(..., help="a finished build's output folder"),
    model: str = typer.Option(..., help="open_clip model, e.g. ViT-B-32"),
    pretrained: Optional[str] = typer.Option(None, help="open_clip tag or local checkpoint path"),
    precision: Optional[str] = typer.Option(None, help="fp32 | fp16 | bf16"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    embed_batch_size: Optional[int] = typer.Option(None, help="encoder batch size"),
    embedding_dtype: Optional[str] = typer.Option(None, help="float16 | float32"),
    fused: Optional[str] = typer.Option(None, help="'mean': also a fused embedding and index"),
    index: Optional[bool] = typer.Option(None, "--index/--no-index", help="rebuild the indexes (default on)"),
) -> None:
    """Re-embed existing shards with another model (reads the tars; no rebuild), then re-index."""
    from mmdata.reembed import reembed

    try:
        manifest = reembed(out, on_shard=lambda name, n: typer.echo(f"embedded {name}: {n} samples", err=True),
                           model=model, pretrained=pretrained, precision=precision, device=device,
                           embed_batch_size=embed_batch_size, embedding_dtype=embedding_dtype, fused=fused, index=index)
    except UserError as err:
        fail(str(err))
    facts = manifest["embeddings"]["encoder"]
    typer.echo(f"{out}: embeddings {', '.join(manifest['embeddings']['modalities'])} with {facts['model']}/{facts['pretrained']}")


@app.command()
def search(
    out: str = typer.Argument(..., help="a build's output folder (with an index)"),
    text: Optional[str] = typer.Option(None, "--text", help="query text (embedded with the build's model)"),
    image: Optional[str] = typer.Option(None, "--image", help="query image path or URL"),
    key: Optional[str] = typer.Option(None, "--key", help="neighbours of a stored sample (itself excluded)"),
    embedding: Optional[Path] = typer.Option(None, "--embedding", help="a .npy query vector"),
    audio: Optional[str] = typer.Option(None, "--audio", help="query audio file path or URL (similar sounds)"),
    modality: Optional[str] = typer.Option(None, "--modality", help="which index to search: image | text | fused | audio "
                                           "(default: audio for --audio, else image)"),
    k: int = typer.Option(10, "-k", min=1, help="number of results"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per result"),
    model: Optional[str] = typer.Option(None, help="must match the build's model (checked; the CLAP model for --modality audio)"),
    pretrained: Optional[str] = typer.Option(None, help="must match the build's weights (checked)"),
) -> None:
    """Nearest neighbours: text→image, image→image, audio→audio, text→audio (CLAP), key→neighbours, embedding→neighbours."""
    import numpy as np

    from mmdata.retrieval import Retriever

    given = [q for q in (text, image, key, embedding, audio) if q is not None]
    if len(given) != 1:
        fail("give exactly one of --text, --image, --key, --embedding, --audio")
    modality = modality or ("audio" if audio is not None else "image")
    try:
        r = Retriever(out)
        chosen = {"model": model, "pretrained": pretrained}
        if text is not None:
            hits = r.search_text(text, k, modality, **chosen)
        elif image is not None:
            hits = r.search_image(image, k, modality, **chosen)
        elif audio is not None:
            if pretrained:
                fail("--pretrained names open_clip weights; an audio query uses the build's audio encoder")
            hits = r.search_audio(audio, k, modality, model=model)
        elif key is not None:
            hits = r.search_key(key, k, modality)
        else:
            try:
                vec = np.load(embedding, allow_pickle=False)
            except (OSError, ValueError) as exc:
                fail(f"cannot read {embedding}: {exc}")
            hits = r.search_embedding(vec, k, modality)
    except UserError as err:
        fail(str(err))
    for h in hits:
        if as_json:
            typer.echo(json.dumps(h.to_dict(), ensure_ascii=False))
        else:
            typer.echo(f"{h.rank:3d}  {h.score:7.4f}  {h.key}  {h.shard}  {h.caption or ''}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
