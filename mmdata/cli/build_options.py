"""The options of ``mmdata build``, generated from the config model (:class:`mmdata.config.BuildConfig`).

Each field's type, default and help text are declared once, on the model; this module only decides
how they look on the command line: the flag spelling (``image_size`` → ``--image-size``, with a few
historical aliases), the help panel a flag is listed in, and the pair of words of a boolean flag.
Every CLI option defaults to "not given" (None), so the model's default applies; the help shows it.
"""
from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any, Callable, List, Literal, Optional

import typer
from typer.core import TyperCommand
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from mmdata.config import BuildConfig

# Panels of `mmdata build --help`, in display order. Every field of the model is in exactly one
# (tests/test_cli_options.py checks it), so a new option cannot be forgotten on the command line.
PANELS: dict[str, tuple[str, ...]] = {
    "Input and output": ("input", "out", "config", "image_col", "text_col", "key_col", "audio_col", "require",
                         "samples_per_shard", "max_source_bytes", "overwrite", "progress", "report"),
    "Images": ("image_size", "resize_mode", "resize_only_if_bigger", "image_format", "image_quality", "jpeg_codec",
               "resize_backend",
               "min_image_size", "max_aspect_ratio", "max_pixels"),
    "Text": ("min_caption_chars", "max_caption_chars", "max_sidecar_bytes", "tokenize", "tokenizer"),
    "Audio": ("sample_rate", "resample_quality", "mono", "normalize", "peak_db", "target_lufs", "trim_silence",
              "top_db", "min_duration", "max_duration", "long_clips", "mel", "n_mels", "n_fft", "hop_length",
              "fmin", "fmax"),
    "Timed transcripts": ("segment_pad", "segment_offset", "min_segment", "max_segment", "max_merge_gap"),
    "Augmentation": ("augment", "views", "augment_seed", "keep_originals", "embed_views"),
    "Embeddings and index": ("model", "pretrained", "model_seed", "embed", "precision", "device",
                             "embed_batch_size", "torch_threads", "reembed_mismatched", "embedding_dtype", "embed_in_shards", "fused", "audio_encoder",
                             "clap_model", "index", "index_memory_gb", "index_recall_target", "index_key",
                             "index_distributed"),
    "Downloads": ("download_threads", "max_download_bytes", "connect_timeout", "read_timeout", "download_timeout",
                  "download_retries", "retry_after_max", "max_redirects", "user_agent", "contact_url",
                  "per_domain_connections", "per_domain_rps", "allow_private_addresses", "optout_directives",
                  "respect_robots_txt", "retry_failed"),
    "Engines": ("engine", "workers", "dask_address", "dask_gpu_resource", "dask_retries", "beam_options"),
    "Curation": ("curate",),
}
# Flags whose spelling is not the field's name (kept from earlier releases).
FLAGS: dict[str, tuple[str, ...]] = {
    "input": ("--input", "-i"), "out": ("--out", "-o"), "beam_options": ("--beam-option",),
    "augment_seed": ("--seed",), "index_memory_gb": ("--index-memory",),
}
# Boolean flags whose "off" word is not --no-<name>.
BOOL_PAIRS: dict[str, str] = {"resize_only_if_bigger": "--resize-only-if-bigger/--resize-always",
                              "mono": "--mono/--keep-channels", "keep_originals": "--keep-originals/--drop-originals"}
REQUIRED = ("input", "out")  # required unless a --config file gives them
CONFIG_HELP = "YAML file with any of these options (flags override it)"


def build_fields() -> dict[str, Any]:
    """Every field a build flag sets: the model's own, with the nested ``audio`` model's fields flat."""
    fields: dict[str, Any] = {}
    for name, field in BuildConfig.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel) and name == "audio":
            fields.update(ann.model_fields)
        else:
            fields[name] = field
    return fields


def _strip_optional(ann: Any) -> Any:
    if typing.get_origin(ann) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _cli_type(ann: Any) -> tuple[Any, str]:
    """(the type typer parses, a note on accepted values for the help)."""
    ann = _strip_optional(ann)
    origin = typing.get_origin(ann)
    if origin is Literal:
        return str, " | ".join(str(a) for a in typing.get_args(ann))
    if origin in (list, List):
        (item,) = typing.get_args(ann) or (str,)
        if typing.get_origin(item) is Literal:
            return str, "comma-separated: " + ", ".join(str(a) for a in typing.get_args(item))
        return List[str], "repeatable"
    if ann in (bool, int, float, str):
        return ann, ""
    return str, ""  # a nested model given by path (augment: a YAML file)


def _default_text(field: Any) -> str:
    default = field.get_default(call_default_factory=True) if field.default_factory else field.default
    if default is PydanticUndefined:
        return ""
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None:
        return ""
    if isinstance(default, list):
        return ",".join(map(str, default)) if default else ""
    return str(default)


def help_text(name: str, field: Any) -> str:
    """The field's description, the values it accepts and its default: all from the model."""
    _, values = _cli_type(field.annotation)
    text = field.description or name.replace("_", " ")
    if values and values != "repeatable" and values not in text:
        text += f" ({values})"
    default = _default_text(field)
    if name in REQUIRED:
        text += " (required)"
    elif default:
        text += f" (default: {default})"
    return text


def panel_of(name: str) -> Optional[str]:
    for panel, names in PANELS.items():
        if name in names:
            return panel
    return None


# Shown by `mmdata build --help`; the other panels by `--help-all`.
BASIC_PANELS = ("Input and output", "Images", "Text", "Embeddings and index")


def _show_all_help(ctx: typer.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        ctx.meta["mmdata_help_all"] = True
        typer.echo(ctx.get_help(), color=ctx.color)
        raise typer.Exit()


def build_parameters() -> list[inspect.Parameter]:
    """The ``mmdata build`` parameters as a function signature that typer reads."""
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                default=typer.Option(None, "--config", "-c", help=CONFIG_HELP,
                                                     rich_help_panel=panel_of("config")))]
    for name, field in build_fields().items():
        cli_type, _ = _cli_type(field.annotation)
        if cli_type is bool:
            decls = (BOOL_PAIRS.get(name) or f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}",)
        else:
            decls = FLAGS.get(name, (f"--{name.replace('_', '-')}",))
        option = typer.Option(None, *decls, help=help_text(name, field), rich_help_panel=panel_of(name) or "Other",
                              show_default=False)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[cli_type],
                                        default=option))
    params.append(inspect.Parameter("help_all", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, "--help-all", is_eager=True, callback=_show_all_help, help="Show every option, in all panels, and exit.")))
    return params


def build_command(run: Callable[[Optional[Path], dict[str, Any]], None], doc: str) -> Callable[..., None]:
    """A function typer can register whose options are the model's fields; it calls ``run(config, flags)``
    with only the flags given on the command line."""
    def command(**kwargs: Any) -> None:
        config = kwargs.pop("config", None)
        kwargs.pop("help_all", None)
        run(config, {k: v for k, v in kwargs.items() if v is not None and v != []})

    command.__signature__ = inspect.Signature(build_parameters())  # type: ignore[attr-defined]
    command.__doc__ = doc
    command.__name__ = "build"
    return command


class PanelCommand(TyperCommand):
    """Plain-text help, options grouped in the panels above: it wraps at the terminal's width (80 columns
    included) and never cuts an option's name, unlike a table squeezed into the width. ``--help`` lists
    the basic panels and names the others; ``--help-all`` lists every option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["rich_markup_mode"] = None
        super().__init__(*args, **kwargs)

    def format_options(self, ctx: Any, formatter: Any) -> None:
        groups: dict[str, list[tuple[str, str]]] = {panel: [] for panel in [*PANELS, "Other", "Help"]}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                panel = getattr(param, "rich_help_panel", None) or ("Help" if param.name in ("help", "help_all") else "Other")
                groups.setdefault(panel, []).append(record)
        show_all = ctx.meta.get("mmdata_help_all", False)
        hidden = [(panel, len(rows)) for panel, rows in groups.items()
                  if rows and not show_all and panel not in (*BASIC_PANELS, "Help")]
        for panel, rows in groups.items():
            if rows and (show_all or panel in (*BASIC_PANELS, "Help")):
                with formatter.section(panel):
                    formatter.write_dl(rows, col_max=28)
        if hidden:
            with formatter.section("More options (mmdata build --help-all)"):
                items = [f"{panel} ({n})" for panel, n in hidden]  # wrapped between items, never inside one
                width, lines = max(20, (formatter.width or 80) - formatter.current_indent - 2), [""]
                for i, item in enumerate(items):
                    piece = item + ("," if i < len(items) - 1 else "")
                    if lines[-1] and len(lines[-1]) + 1 + len(piece) > width:
                        lines.append("")
                    lines[-1] = f"{lines[-1]} {piece}" if lines[-1] else piece
                for line in lines:
                    formatter.write(" " * formatter.current_indent + line + "\n")
