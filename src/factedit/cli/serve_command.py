"""`factedit serve`: the web workbench."""

from __future__ import annotations

import click

from . import _model_options, _stats_options, main


@main.command()
@_model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (local only by default)")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@_stats_options
def serve(model, host, port, corpus, stats_tokens):
    """Start the web workbench: trace, edit and compare the model's facts in the browser."""
    import uvicorn

    from ..server.app import create_app
    from ..server.workbench import Workbench

    lm = model.load()
    app = create_app(Workbench(lm, stats_corpus=corpus, stats_tokens=stats_tokens))
    click.echo(f"factedit workbench on http://{host}:{port}/  (API documentation at /docs)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
