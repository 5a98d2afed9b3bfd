"""`factedit history edit | show | revert`: lifelong editing from the command line. A history folder
holds batches of edits applied one after another (factedit.edit.EditHistory); each `history edit`
replays them onto the freshly loaded model, computes the next batch on top of them (AlphaEdit leaves
the earlier batches' keys alone) and saves it there, so that a sequence goes on tomorrow where it
stopped today."""

from __future__ import annotations

from pathlib import Path

import click

from .options import (COUNT, INDEX, SEED, SETTINGS_HELP, CommandError, choose_settings, lifelong_inputs, model_options,
                      stats_options)
from .progress_bars import PhaseBars


@click.group()
def history():
    """Edit in batches, one on top of the other, kept in a folder (lifelong editing)."""


@history.command("edit")
@model_options
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--requests", "-r", "requests_file", required=True, type=click.Path(dir_okay=False),
              help='JSON list of {"prompt", "subject", "target_new"[, "target_true"]} or of CounterFact records')
@click.option("--method", default="alphaedit", show_default=True, help="an editing method (see factedit methods)")
@click.option("--layer", type=INDEX, default=None, help="layer to edit, for single-layer methods (default: per model)")
@click.option("--settings", "settings_file", default=None, help=SETTINGS_HELP)
@stats_options
@click.option("--seed", type=SEED, default=0, show_default=True, help="seed of the sampled context prefixes")
@click.option("--guard", "guards", multiple=True, metavar="NAME=LIMIT",
              help="keep the batch only if it costs the model at most this: perplexity=RATIO (held-out perplexity "
                   "after / before, e.g. 1.05) and/or known=SHARE (of the known facts answered before, the share "
                   "still answered, e.g. 0.98); else it is refused and nothing changes (repeatable)")
@click.option("--held-out", default=None, help="--guard perplexity: text whose last documents are the probe "
                                                "(default: the statistics corpus)")
@click.option("--known", default=None, help="--guard known: known facts (default $FACTEDIT_DATA_DIR/known_1000.json)")
def history_edit(model, folder, requests_file, method, layer, settings_file, corpus, stats_tokens, seed, guards,
                 held_out, known):
    """Apply the requests as one more batch on top of the history in FOLDER (created if new) and save
    it there; show how the new and the earlier edits fare."""
    from ..data.requests import load_requests
    from ..edit import EditHistory, get_method
    from ..evaluate.guard import Guard, GuardLimits
    from ..tokens import check_prompt_length
    from ..workflows import add_batch_with_report, preferred_count

    spec = get_method(method)
    requests = load_requests(requests_file)  # a bad file fails before the model loads
    limits = GuardLimits.parse(guards) if guards else None
    chosen = choose_settings(spec, settings_file, layer, stats_corpus=corpus, stats_tokens=stats_tokens,
                             prefix_seed=seed)
    lm = model.load()
    for i, request in enumerate(requests):
        check_prompt_length(lm, request.text, f"{requests_file}: request {i}")
    settings = chosen.for_model(lm)
    history = EditHistory(lm, folder, lock=True)  # a second writer is refused here, before any work
    try:
        replayed = history.replay()
        guard = None
        if limits is not None:  # its facts are those the model answers as the history left it
            text, facts = lifelong_inputs(held_out, corpus, known)
            guard = Guard(lm, limits, held_out=text, known=facts)
        with PhaseBars() as bars:
            batch = add_batch_with_report(history, requests, method, settings, progress=bars, guard=guard)
    finally:
        history.release()
    click.echo(f"history {folder}: {replayed} batch(es) replayed, {len(batch.earlier)} edit(s) to check; edited "
               f"{len(requests)} more with {method}")
    for line in batch_lines(batch.requests, batch.new_before, batch.new_after):
        click.echo(line)
    click.echo(f"this batch: {preferred_count(batch.new_after)} of {len(requests)} prompts now prefer the new object")
    if batch.earlier:
        click.echo(f"earlier edits: {preferred_count(batch.earlier_before)} of {len(batch.earlier)} preferred their "
                   f"new object before this batch, {preferred_count(batch.earlier_after)} after it")
    if batch.protected:
        click.echo(f"protected facts: {batch.protected_before} of {len(batch.protected)} answered before this batch, "
                   f"{batch.protected_after} after it")
    for line in batch.lines:
        click.echo(line)
    if batch.cost is not None:
        click.echo(f"guard: the batch cost {batch.cost.describe()}, within the limits")
    click.echo(f"saved batch {batch.batch_number} to {batch.saved}")


def batch_lines(requests, before, after) -> list[str]:
    """A table: p(old) and p(new) before -> after for each request of the batch."""
    lines = [f"{'p(old) before -> after':>24} {'p(new) before -> after':>24}  prompt: old -> new"]
    for request, (old_0, new_0), (old_1, new_1) in zip(requests, before, after):
        lines.append(f"{old_0:10.4f} -> {old_1:<10.4f} {new_0:10.4f} -> {new_1:<10.4f}  {request.text!r}: "
                     f"{request.target_true.strip()!r} -> {request.target_new.strip()!r}")
    return lines


@history.command("protect")
@model_options
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--facts", default=None, help="known facts (default: $FACTEDIT_DATA_DIR/known_1000.json)")
@click.option("--n", type=COUNT, default=None, help="the first N of the facts (default: all)")
@click.option("--keys", "tokens", type=click.Choice(["subject", "prompt"]), default="subject", show_default=True,
              help="the keys kept: at the subject's last token (as for an edit) or at every prompt token")
@click.option("--settings", "settings_file", default=None, help=SETTINGS_HELP + " (AlphaEdit's: its layers)")
@stats_options
def history_protect(model, folder, facts, n, tokens, settings_file, corpus, stats_tokens):
    """Add the facts the model now answers correctly to the history in FOLDER as a protection batch: it
    changes no weight, and later AlphaEdit batches leave these facts' keys alone."""
    from ..data.known import first, load_known_facts
    from ..edit import EditHistory, EditRequest, get_method
    from ..edit.alphaedit import protection
    from ..evaluate.lifelong import answered

    candidates = first(load_known_facts(facts), n)
    chosen = choose_settings(get_method("alphaedit"), settings_file, None, stats_corpus=corpus,
                             stats_tokens=stats_tokens)
    lm = model.load()
    settings = chosen.for_model(lm)
    history = EditHistory(lm, folder, lock=True)
    try:
        history.replay()
        kept = [fact for fact, ok in zip(candidates, answered(lm, candidates)) if ok]
        if not kept:
            raise CommandError(f"the model (with the {len(history)} batch(es) of {folder}) answers none of the "
                               f"{len(candidates)} facts; nothing to protect")
        history.apply(protection(lm, [EditRequest.create(f.prompt, f.subject, f.attribute) for f in kept],
                                 settings, tokens))
        saved = history.saved_files[-1]
    finally:
        history.release()
    click.echo(f"protected {len(kept)} of {len(candidates)} facts (those the model answers now; keys at the "
               f"{tokens} tokens, layers {settings.layers}); saved to {saved}")


@history.command("show")
@click.argument("folder", type=click.Path(file_okay=False))
def history_show(folder):
    """List the batches of the history in FOLDER (no model needed)."""
    from ..edit import METHODS, get_method
    from ..edit.manifest import load_batch, read_manifest, stray_batch_files

    manifest = read_manifest(folder)
    click.echo(f"history of {manifest.model} (fingerprint {manifest.model_fingerprint}): "
               f"{len(manifest.batches)} batch(es)")
    for name in stray_batch_files(Path(folder), manifest.batches):
        click.echo(f"note: ignoring {name}: the manifest does not name it (left by a write that was interrupted)")
    total = 0
    for number, entry in enumerate(manifest.batches, 1):
        name, delta = entry.file, load_batch(Path(folder), entry)
        edits = len(delta.requests) if delta.method != "protect" else 0
        total += edits
        what = (f"protects {len(delta.requests)} fact(s)" if delta.method == "protect" else
                f"{edits} edit(s), {total} in all")
        seconds = delta.info.get("edit_seconds")
        took = f", {seconds:.1f} s" if isinstance(seconds, (int, float)) else ""
        layers = get_method(delta.method).edited_layers(delta.settings) if delta.method in METHODS else None
        where = f"layers {layers}" if layers is not None else f"{len(delta.changes)} module(s)"
        click.echo(f"{number:4}  {name}  {delta.method:10} {what}{took}; "
                   f"{where if delta.changes else 'no weight change'}")


@history.command("revert")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--last", type=COUNT, default=1, show_default=True, help="how many of the last batches to remove")
def history_revert(folder, last):
    """Remove the last batches of the history in FOLDER (no model needed): replaying it afterwards
    gives the weights and the preserved keys of the model before them."""
    from ..edit.history import read_manifest, remove_last_batches

    removed = remove_last_batches(folder, last)
    left = len(read_manifest(folder).batches)
    click.echo(f"removed {', '.join(removed)}; {left} batch(es) left in {folder}")
