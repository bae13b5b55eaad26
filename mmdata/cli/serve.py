"""``mmdata serve OUT``: search a build in the browser (and over a JSON API) on 127.0.0.1."""
from __future__ import annotations

import typer

from mmdata.errors import UserError


def serve(out: str = typer.Argument(..., help="a build's output folder (with an index)"),
          host: str = typer.Option("127.0.0.1", help="address to bind (127.0.0.1: this machine only)"),
          port: int = typer.Option(8080, min=0, max=65535, help="port to listen on"),
          max_upload_mb: float = typer.Option(20.0, min=0.001, help="largest upload (image, audio, JSON) in MB"),
          cors: bool = typer.Option(False, "--cors/--no-cors", help="let pages of other origins (clip-retrieval's "
                                    "front end) call the API; off by default, since any page open in a "
                                    "browser could then query the build")) -> None:
    """Serve a search page, a JSON API and clip-retrieval's /knn-service over a build."""
    try:
        from mmdata.serve import make_app
    except ImportError as exc:
        typer.echo(f"error: mmdata serve needs the 'see' extra (pip install 'mmdata[see]'): {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        app = make_app(out, max_upload=int(max_upload_mb * 2**20), cors=cors)
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    import uvicorn

    typer.echo(f"serving {out} at http://{host}:{port}/  (Ctrl-C to stop)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
