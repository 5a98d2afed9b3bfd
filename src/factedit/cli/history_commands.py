"""`factedit history edit | show | revert`: lifelong editing from the command line. A history folder
holds batches of edits applied one after another (factedit.edit.EditHistory); each `history edit`
replays them onto the freshly loaded model, computes the next batch on top of them (AlphaEdit leaves
the earlier batches' keys alone) and saves it there, so that a sequence goes on tomorrow where it
stopped today."""

from __future__ import annotations

from pathlib import Path

import click

from . import COUNT, INDEX, SEED, SETTINGS_HELP, CommandError, _model_options, _settings, _stats_options, main
from .edit_commands import PhaseBars


@main.group()
def history():
    """Edit in batches, one on top of the other, kept in a folder (lifelong editing)."""


@history.command("edit")
@_model_options
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--requests", "-r", "requests_file", required=True, type=click.Path(dir_okay=False),
              help='JSON list of {"prompt", "subject", "target_new"[, "target_true"]} or of CounterFact records')
@click.option("--method", default="alphaedit", show_default=True, help="an editing method (see factedit methods)")
@click.option("--layer", type=INDEX, default=None, help="layer to edit, for single-layer methods (default: per model)")
@click.option("--settings", "settings_file", default=None, help=SETTINGS_HELP)
@_stats_options
@click.option("--seed", type=SEED, default=0, show_default=True, help="seed of the sampled context prefixes")
def history_edit(model, folder, requests_file, method, layer, settings_file, corpus, stats_tokens, seed):
    """Apply the requests as one more batch on top of the history in FOLDER (created if new) and save
    it there; show how the new and the earlier edits fare."""
    from ..data.requests import load_requests
    from ..edit import EditHistory, EditRequest, get_method
    from ..generate import with_current_target
    from ..tokens import check_prompt_length

    spec = get_method(method)
    requests = load_requests(requests_file)  # a bad file fails before the model loads
    chosen = _settings(spec, settings_file, layer, stats_corpus=corpus, stats_tokens=stats_tokens, prefix_seed=seed)
    lm = model.load()
    for i, request in enumerate(requests):
        check_prompt_length(lm, request.text, f"{requests_file}: request {i}")
    settings = chosen.for_model(lm)
    history = EditHistory(lm, folder, lock=True)  # a second writer is refused here, before any work
    try:
        history.replay()
        requests = [with_current_target(lm, r) for r in requests]  # on the model as the history left it
        # what earlier batches edited (not the facts a protection batch names); a request saved
        # without its old object cannot be scored against it
        earlier = [EditRequest.from_dict(r) for batch in history.batches if batch.method != "protect"
                   for r in batch.requests if r.get("target_true")]
        protected = [EditRequest.from_dict(r) for batch in history.batches if batch.method == "protect"
                     for r in batch.requests]
        click.echo(f"history {folder}: {len(history)} batch(es) replayed, {len(earlier)} edit(s) to check; editing "
                   f"{len(requests)} more with {method}")
        new_before, earlier_before = preference(lm, requests), preference(lm, earlier)
        protected_before = answered_count(lm, protected)
        with PhaseBars() as bars:
            delta, diagnostics = history.edit(requests, method, settings, progress=bars)
        new_after, earlier_after = preference(lm, requests), preference(lm, earlier)
        protected_after = answered_count(lm, protected)
        batches, saved = len(history), history.saved_files[-1]
    finally:
        history.release()
    for line in batch_lines(requests, new_before, new_after):
        click.echo(line)
    wins = sum(new > old for old, new in new_after)
    click.echo(f"this batch: {wins} of {len(requests)} prompts now prefer the new object")
    if earlier:
        held = [sum(new > old for old, new in scores) for scores in (earlier_before, earlier_after)]
        click.echo(f"earlier edits: {held[0]} of {len(earlier)} preferred their new object before this batch, "
                   f"{held[1]} after it")
    if protected:
        click.echo(f"protected facts: {protected_before} of {len(protected)} answered before this batch, "
                   f"{protected_after} after it")
    if delta.info.get("unpreserved_batches"):
        click.echo(f"note: {delta.info['unpreserved_batches']} earlier batch(es) of other methods changed these layers "
                   "without recording keys; AlphaEdit could not preserve what they wrote")
    failed = sum(1 for d in diagnostics if d.get("converged") is False)
    if failed:
        click.echo(f"warning: {failed} of {len(diagnostics)} value optimisations did not converge; those edits "
                   "may not hold (raise v_steps with a settings file)")
    click.echo(f"saved batch {batches} to {saved}")


def preference(lm, requests) -> list[tuple[float, float]]:
    """(p(target_true), p(target_new)) on each request's own prompt."""
    from ..scoring import target_probs

    if not requests:
        return []
    prompts = [r.text for r in requests]
    old = target_probs(lm, prompts, [r.target_true for r in requests])
    new = target_probs(lm, prompts, [r.target_new for r in requests])
    return list(zip(old, new))


def answered_count(lm, facts) -> int:
    """How many facts (requests whose target_new is the answer, as a protection batch keeps them) the
    model answers (factedit.evaluate.lifelong.answered)."""
    from ..data.known import KnownFact
    from ..evaluate.lifelong import answered

    return sum(answered(lm, [KnownFact(i, f.subject, f.target_new, f.text) for i, f in enumerate(facts)]))


def batch_lines(requests, before, after) -> list[str]:
    """A table: p(old) and p(new) before -> after for each request of the batch."""
    lines = [f"{'p(old) before -> after':>24} {'p(new) before -> after':>24}  prompt: old -> new"]
    for request, (old_0, new_0), (old_1, new_1) in zip(requests, before, after):
        lines.append(f"{old_0:10.4f} -> {old_1:<10.4f} {new_0:10.4f} -> {new_1:<10.4f}  {request.text!r}: "
                     f"{request.target_true.strip()!r} -> {request.target_new.strip()!r}")
    return lines


@history.command("protect")
@_model_options
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--facts", default=None, help="known facts (default: $FACTEDIT_DATA_DIR/known_1000.json)")
@click.option("--n", type=COUNT, default=None, help="the first N of the facts (default: all)")
@click.option("--keys", "tokens", type=click.Choice(["subject", "prompt"]), default="subject", show_default=True,
              help="the keys kept: at the subject's last token (as for an edit) or at every prompt token")
@click.option("--settings", "settings_file", default=None, help=SETTINGS_HELP + " (AlphaEdit's: its layers)")
@_stats_options
def history_protect(model, folder, facts, n, tokens, settings_file, corpus, stats_tokens):
    """Add the facts the model now answers correctly to the history in FOLDER as a protection batch: it
    changes no weight, and later AlphaEdit batches leave these facts' keys alone."""
    from ..data.known import first, load_known_facts
    from ..edit import EditHistory, EditRequest, get_method
    from ..edit.alphaedit import protection
    from ..evaluate.lifelong import answered

    candidates = first(load_known_facts(facts), n)
    chosen = _settings(get_method("alphaedit"), settings_file, None, stats_corpus=corpus, stats_tokens=stats_tokens)
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
        layers = delta.settings.get("layers") or [delta.settings.get("layer")]
        where = f"layers {layers}" if delta.changes and None not in layers else f"{len(delta.changes)} module(s)"
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
