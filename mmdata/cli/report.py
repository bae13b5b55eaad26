"""``mmdata report OUT``: (re)make OUT/report.html from a finished build."""
from __future__ import annotations

import typer

from mmdata.errors import UserError


def report(out: str = typer.Argument(..., help="a finished build's output folder")) -> None:
    """Write OUT/report.html: counts, reasons with examples, plots, samples, neighbours (one self-contained file)."""
    from mmdata.report import write_report

    try:
        path = write_report(out)
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(path)
