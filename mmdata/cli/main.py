"""The ``mmdata`` command line. Every problem the user must fix prints one line and exits 2."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from mmdata.cli.build_options import PanelCommand, build_command
from mmdata.cli.curate import curate as curate_command
from mmdata.cli.curate import curate_section, run_curate_section
from mmdata.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn raw multimodal corpora into training-ready WebDataset shards, metadata, embeddings and indexes.")


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _run_build(config: Optional[Path], flags: dict) -> None:
    from mmdata.build import build as run_build
    from mmdata.config import load_config

    try:
        if flags.get("retry_failed") and "input" not in flags and config is None and flags.get("out"):
            from mmdata.pipeline.retry import saved_config  # -o OUT --retry-failed: the build's own settings

            flags = {**saved_config(flags["out"]), **flags}
        cfg = load_config(str(config) if config else None, **flags)
        section = curate_section(cfg)  # a curate: section is checked before the build starts
        manifest = run_build(cfg)
    except UserError as err:
        fail(str(err))
    print_summary(manifest, cfg.out)
    if section is not None:
        run_curate_section(cfg, section)


# Every option of `mmdata build` comes from the config model (mmdata/cli/build_options.py).
app.command(name="build", cls=PanelCommand)(build_command(_run_build, "Build WebDataset shards (and their tables) from a corpus."))
app.command(name="curate")(curate_command)


def _counts_line(records: int, c: dict) -> str:
    rows = f"{records} records" if records == c["inputs"] else f"{records} records, {c['inputs']} rows"
    return f"{rows}: {c['written']} written, {c['filtered']} filtered, {c['failed']} failed"


def print_summary(manifest: dict, out: str) -> None:
    c = manifest["counts"]
    records = manifest.get("records", c["inputs"])  # rows outnumber records with segments and views
    timing = (f"in {manifest['timings']['wall_seconds']:.1f} s "
              f"({manifest['timings']['samples_per_second']:.1f} samples/s)")
    run = manifest.get("run") or {}
    if run.get("units_skipped"):  # a resumed build: this run's work, then the whole output's
        from mmdata.build import resume_line

        typer.echo(f"resumed: {resume_line(run['units_skipped'], manifest['units'])}")
        typer.echo(f"this run: {_counts_line(run['records'], run['counts'])} {timing}")
        typer.echo(f"in total: {_counts_line(records, c)}")
    else:
        typer.echo(f"{_counts_line(records, c)} {timing}")
    for status in ("filtered", "failed"):
        for reason, n in sorted(manifest["reasons"][status].items(), key=lambda kv: -kv[1]):
            typer.echo(f"  {status:8s} {n:6d}  {reason}")
    typer.echo(f"output: {out}  ({manifest['units']} shards in {out.rstrip('/')}/shards)")


@app.command()
def inspect(shard: str = typer.Argument(..., help="a .tar shard (any fsspec URL)"),
            as_json: bool = typer.Option(False, "--json", help="one JSON object per sample")) -> None:
    """List the samples of a shard and their members."""
    import tarfile

    from mmdata.tools.inspect import describe_shard

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
    from mmdata.tools.verify import verify_report

    try:
        problems, checked = verify_report(out)
    except UserError as err:
        fail(str(err))
    for p in problems:
        typer.echo(f"MISMATCH {p}", err=True)
    if problems:
        raise typer.Exit(1)
    c = checked
    embeddings = (f", {c['embedding_files']} embedding files ({', '.join(c['modalities'])})"
                  if c.get("modalities") else "")
    typer.echo(f"{out}: ok: {c['shards']} shards, {c['samples']} samples; {c['inputs']} records = "
               f"{c['samples']} written + {c['filtered']} filtered + {c['failed']} failed{embeddings}")


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
    model_seed: Optional[int] = typer.Option(None, help="seed of random weights (--pretrained random)"),
    torch_threads: Optional[int] = typer.Option(None, min=1, help="torch threads per worker (default 1)"),
    reembed_mismatched: bool = typer.Option(False, "--reembed-mismatched",
                                            help="re-embed staged units of an interrupted run that used another "
                                                 "set-up (device kind, precision, threads) instead of refusing"),
    engine: Optional[str] = typer.Option(None, help="local | dask | beam (as build)"),
    workers: Optional[int] = typer.Option(None, min=1, help="worker processes (default: cores)"),
    dask_address: Optional[str] = typer.Option(None, help="Dask scheduler; default: a LocalCluster"),
) -> None:
    """Re-embed existing shards with another model (reads the tars; no rebuild), then re-index.
    Atomic and resumable: killed, the output keeps the old embeddings, index and manifest (or has
    the new ones); a re-run resumes."""
    from mmdata.tools.reembed import reembed

    try:
        manifest = reembed(out, on_shard=lambda name, n: typer.echo(f"embedded {name}: {n} samples", err=True),
                           model=model, pretrained=pretrained, precision=precision, device=device,
                           embed_batch_size=embed_batch_size, embedding_dtype=embedding_dtype, fused=fused, index=index,
                           model_seed=model_seed, torch_threads=torch_threads, reembed_mismatched=reembed_mismatched,
                           engine=engine, workers=workers, dask_address=dask_address, progress=False)
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

    from mmdata.search import Retriever

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


app.command(name="report")(__import__("mmdata.cli.report", fromlist=["report"]).report)
app.command(name="serve")(__import__("mmdata.cli.serve", fromlist=["serve"]).serve)


def main() -> None:
    """Run the CLI; its own usage errors (unknown option, bad value) print one ``error:`` line too."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(1)
    except typer.TyperException as exc:  # click's ClickException and UsageError
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `mmdata`: the help screen
            exc.show()
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None and exc.exit_code == 2 else ""
        typer.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)
    code = code if isinstance(code, int) else 0
    if code:
        # An error exit has nothing left to write (outputs are committed atomically), so skip the interpreter's
        # teardown: under load, native thread pools (Arrow, OpenMP) torn down there have aborted the process
        # ("terminate called without an active exception", exit -6) after the error line, hiding the exit code.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(0)


if __name__ == "__main__":
    sys.exit(main())
