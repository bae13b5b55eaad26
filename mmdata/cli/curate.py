"""``mmdata curate OUT --out CURATED``: dedup and filter a finished build into a new one."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mmdata.errors import UserError


def _list(value: Optional[str]) -> Optional[list[str]]:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def curate(
    build: str = typer.Argument(..., help="a finished build's output folder"),
    out: str = typer.Option(..., "--out", help="the curated build's folder"),
    config: Optional[Path] = typer.Option(None, "--config", help="curate.yaml: a mapping of these options, or a curate: section"),
    engine: Optional[str] = typer.Option(None, help="local | dask | beam"),
    workers: Optional[int] = typer.Option(None, min=1, help="worker processes"),
    dask_address: Optional[str] = typer.Option(None, help="Dask scheduler address"),
    beam_options: Optional[list[str]] = typer.Option(None, "--beam-option", help="Beam pipeline option (repeat)"),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="replace an earlier curated output"),
    samples_per_shard: Optional[int] = typer.Option(None, min=1, help="kept samples per curated shard"),
    exact: Optional[str] = typer.Option(None, help="exact dedup modalities, comma-separated (image,text,audio; '' for none)"),
    phash_max_distance: Optional[int] = typer.Option(None, min=-1, help="pHash Hamming distance for image dedup (-1: off)"),
    semantic: Optional[str] = typer.Option(None, help="SemDeDup modalities, comma-separated: image,text,audio,pair"),
    semantic_eps: Optional[float] = typer.Option(None, help="duplicates: cosine ≥ 1 - eps"),
    semantic_clusters: Optional[int] = typer.Option(None, min=1, help="k-means clusters (default: about sqrt(n))"),
    semantic_keep: Optional[str] = typer.Option(None, help="which of a group stays: nearest | farthest (its cluster centre)"),
    semantic_train_size: Optional[int] = typer.Option(None, min=1, help="vectors k-means trains on at most"),
    seed: Optional[int] = typer.Option(None, help="seed of the k-means sample and initialisation"),
    clip_min: Optional[float] = typer.Option(None, help="filter pairs with image·text cosine below this"),
    clip_top_fraction: Optional[float] = typer.Option(None, help="keep this top fraction by CLIP score"),
    languages: Optional[str] = typer.Option(None, help="keep captions in these languages, comma-separated (en,de)"),
    language_min_score: Optional[float] = typer.Option(None, help="a caption is in a listed language only with this confidence"),
    min_words: Optional[int] = typer.Option(None, help="filter captions with fewer words"),
    max_words: Optional[int] = typer.Option(None, help="filter captions with more words"),
    tokenizer: Optional[str] = typer.Option(None, help="a Hugging Face tokenizer.json: token counts (offline)"),
    min_tokens: Optional[int] = typer.Option(None, help="filter captions with fewer tokens"),
    tokens_member: Optional[bool] = typer.Option(None, "--tokens-member", help="write {key}.llm_tokens.npy (the tokenizer's ids)"),
    max_tokens: Optional[int] = typer.Option(None, help="filter captions with more tokens"),
    min_speech_ratio: Optional[float] = typer.Option(None, help="filter audio with less speech (Silero VAD)"),
    max_speech_ratio: Optional[float] = typer.Option(None, help="filter audio with more speech"),
    min_loudness: Optional[float] = typer.Option(None, help="filter audio quieter than this (LUFS)"),
    max_loudness: Optional[float] = typer.Option(None, help="filter audio louder than this (LUFS)"),
    max_clipping: Optional[float] = typer.Option(None, help="filter audio with more clipped samples"),
    exclude_near: Optional[str] = typer.Option(None, "--exclude-near", help="an evaluation build: remove samples near it"),
    exclude_modality: Optional[str] = typer.Option(None, help="embeddings --exclude-near compares: image | text | audio | fused"),
    exclude_min_cosine: Optional[float] = typer.Option(None, help="--exclude-near removes cosine ≥ this"),
) -> None:
    """Deduplicate and filter a build into a new build; every removed sample keeps a row saying why."""
    from mmdata.curate import curate as run_curate
    from mmdata.curate import load_curate_config

    flags = dict(engine=engine, workers=workers, dask_address=dask_address, overwrite=overwrite, beam_options=beam_options,
                 semantic_clusters=semantic_clusters, semantic_keep=semantic_keep, semantic_train_size=semantic_train_size,
                 seed=seed, language_min_score=language_min_score, max_speech_ratio=max_speech_ratio,
                 max_loudness=max_loudness, exclude_modality=exclude_modality,
                 samples_per_shard=samples_per_shard, exact=_list(exact), semantic=_list(semantic),
                 semantic_eps=semantic_eps, clip_min=clip_min, clip_top_fraction=clip_top_fraction,
                 languages=_list(languages), min_words=min_words, max_words=max_words, tokenizer=tokenizer,
                 min_tokens=min_tokens, tokens_member=tokens_member, phash_max_distance=phash_max_distance, max_tokens=max_tokens, min_speech_ratio=min_speech_ratio,
                 min_loudness=min_loudness, max_clipping=max_clipping, exclude_near=exclude_near,
                 exclude_min_cosine=exclude_min_cosine)
    try:
        cfg = load_curate_config(str(config) if config else None, **flags)
        manifest = run_curate(build, out, cfg)
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    _summary(manifest, out)


def curate_section(build_config) -> Optional[tuple[str, object]]:
    """(curated folder, CurateConfig) of a build config's ``curate:`` section, checked; None without one.
    The engine options default to the build's; an earlier curated output in that folder is replaced."""
    from mmdata.curate import load_curate_config

    if build_config.curate is None:
        return None
    section = {str(k).replace("-", "_"): v for k, v in build_config.curate.items()}
    out = section.pop("out", None)
    if not isinstance(out, str) or not out:
        raise UserError("the curate: section needs out: the curated build's folder")
    for name in ("engine", "workers", "dask_address", "beam_options"):
        section.setdefault(name, getattr(build_config, name))
    section.setdefault("overwrite", True)  # derived from the build: a re-run replaces it (mmdata files only)
    return out, load_curate_config(**section)


def run_curate_section(build_config, section: tuple[str, object]) -> None:
    """Curate the finished build into the section's folder (``mmdata build`` with a ``curate:`` section)."""
    from mmdata.curate import curate as run_curate

    out, cfg = section
    try:
        manifest = run_curate(build_config.out, out, cfg)
    except UserError as err:
        typer.echo(f"error: curate: {err}", err=True)
        raise typer.Exit(2) from None
    _summary(manifest, out)


def _summary(manifest: dict, out: str) -> None:
    c = manifest["counts"]
    typer.echo(f"{c['inputs']} rows: {c['written']} written, {c['filtered']} filtered, {c['failed']} failed")
    for reason, n in sorted(manifest["curate"]["removed"].items(), key=lambda kv: (-kv[1], kv[0])):
        typer.echo(f"  removed {n:6d}  {reason}")
    typer.echo(f"output: {out}  ({manifest['units']} shards)")
