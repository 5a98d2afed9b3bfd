"""`factedit serve`: the web workbench."""

from __future__ import annotations

import click

from .options import model_options, stats_options


@click.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to bind: loopback (this machine only) by default; any other needs a token (see --token)")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--allow-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="also answer requests addressed to this host name (one the workbench is reached by, e.g. "
                   "through a proxy); repeatable. Loopback names and addresses and the address served always work")
@click.option("--token/--no-token", default=None,
              help="require a token, printed in the URL (default: only when not bound to loopback); its value is "
                   "random unless $FACTEDIT_TOKEN sets it. --no-token lets anyone who can reach the port change "
                   "the model")
@stats_options
def serve(model, host, port, allowed_hosts, token, corpus, stats_tokens):
    """Start the web workbench: trace, edit and compare the model's facts in the browser."""
    import os
    import secrets

    import uvicorn

    from ..server.access import Access, is_loopback, is_wildcard
    from ..server.app import create_app
    from ..server.workbench import Workbench

    local = is_loopback(host)
    explicit = os.environ.get("FACTEDIT_TOKEN", "").strip()
    if token is None:
        token = not local or bool(explicit)
    secret = (explicit or secrets.token_urlsafe(32)) if token else None
    # A name given to --host is a name the workbench is reached by (its addresses are trusted anyway).
    access = Access(secret, [*allowed_hosts, *([] if is_wildcard(host) else [host])])
    lm = model.load()
    app = create_app(Workbench(lm, stats_corpus=corpus, stats_tokens=stats_tokens), access)
    shown = ("::1" if ":" in host else "127.0.0.1") if is_wildcard(host) else host  # wildcards include loopback
    shown = f"[{shown}]" if ":" in shown else shown
    query = f"?token={secret}" if secret else ""
    click.echo(f"factedit workbench on http://{shown}:{port}/{query}  (API documentation at /docs)", err=True)
    if not local:
        where = "every network interface" if is_wildcard(host) else host
        who = ("anyone who can reach it and has the token above" if secret else
               "ANYONE who can reach it (--no-token: no token is asked for)")
        click.secho(f"WARNING: the workbench listens on {host} ({where}), not on loopback: {who} can read and "
                    f"change the served model. Use the default --host 127.0.0.1 unless you mean this. Other "
                    f"machines open it by this machine's address (http://ADDRESS:{port}/{query}); by a host name, "
                    f"only if --allow-host names it.", err=True, fg="red", bold=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
