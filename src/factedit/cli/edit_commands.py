"""`factedit edit`, `generate`, `export`, `stats`, `suggest-layer`, `methods`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click

from ..cache_files import check_output_file, check_output_folder
from .options import (COUNT, INDEX, OCCURRENCE_HELP, SEED, SETTINGS_HELP, CommandError, choose_settings,
                      cluster_options, cluster_run, load_edits, model_options, stats_options)
from .progress_bars import PhaseBars, stderr_bar


HISTORY_HELP = "a history folder (factedit history edit) whose batches are applied first"


@click.command()
def methods():
    """List the editing methods."""
    from ..edit import METHODS

    for name, spec in METHODS.items():
        click.echo(f"{name:14} {spec.description}")


@click.command("edit")
@model_options
@click.option("--prompt", "-p", required=True, help='template with {} for the subject, or a full prompt')
@click.option("--subject", "-s", required=True)
@click.option("--occurrence", type=click.IntRange(min=0), default=None, metavar="N",
              help=OCCURRENCE_HELP + "; with a full prompt, not a template")
@click.option("--target", "-t", required=True, help="the new object, e.g. Rome")
@click.option("--true", "target_true", default=None, help="the current object (default: the model's top token)")
@click.option("--method", default="rome", show_default=True, help="an editing method (see factedit methods)")
@click.option("--layer", type=INDEX, default=None, help="layer to edit (default: per-model structural default)")
@click.option("--settings", "settings_file", default=None, help=SETTINGS_HELP)
@click.option("--paraphrase", multiple=True, help="extra prompts to check (repeatable)")
@stats_options
@click.option("--seed", type=SEED, default=0, show_default=True, help="seed of the sampled context prefixes")
@click.option("--save", type=click.Path(dir_okay=False), default=None, help="write the edit to this .safetensors file")
def edit_command(model, prompt, subject, occurrence, target, target_true, method, layer, settings_file,
                 paraphrase, corpus, stats_tokens, seed, save):
    """Rewrite one fact (with ROME unless --method says otherwise) and show the model before and after;
    for batches on top of earlier edits, see factedit history."""
    from ..edit import EditRequest, get_method
    from ..tokens import check_prompt_length
    from ..workflows import edit_with_report

    if save:
        check_output_file(Path(save), "save the edit to")  # before loading the model and computing the edit
    spec = get_method(method)
    request = EditRequest.create(prompt, subject, target, target_true, occurrence)  # FriendlyGroup shows warnings
    chosen = choose_settings(spec, settings_file, layer, stats_corpus=corpus, stats_tokens=stats_tokens,
                             prefix_seed=seed)
    lm = model.load()
    check_prompt_length(lm, request.text)
    for i, text in enumerate(paraphrase):
        check_prompt_length(lm, text, f"--paraphrase {i + 1}")
    settings = chosen.for_model(lm)
    click.echo(f"editing {spec.where(settings)} with {method}: {request.text!r} -> {request.target_new!r}")
    with PhaseBars() as bars:
        made = edit_with_report(lm, request, method, settings, paraphrases=list(paraphrase), seed=seed,
                                progress=bars)
    for line in report_lines(made.report) + made.lines:
        click.echo(line)
    delta = made.delta
    if save:
        save_edit(delta, Path(save))
        click.echo(f"saved the edit to {save}")


def report_lines(report) -> list[str]:
    """The before/after report (factedit.report.EditReport) as text: a table of p(old) and p(new)
    before -> after per prompt, then the greedy generations (line breaks shown as ' / ')."""
    lines = [f"{'':22} {'p(' + report.old.strip() + ')':>22} {'p(' + report.new.strip() + ')':>22}"]
    for row in report.rows:
        lines.append(f"{row.label:22} {row.old_before:9.4f} -> {row.old_after:<9.4f} "
                     f"{row.new_before:9.4f} -> {row.new_after:<9.4f}  {row.prompt!r}")
    lines.append(f"before: {report.generation_before}".replace("\n", " / "))
    lines.append(f"after:  {report.generation_after}".replace("\n", " / "))
    return lines


def save_edit(delta, path: Path) -> None:
    """Write the edit to `path`; if that fails after all, keep the computed edit in a temporary file and
    say where, so that the work is not lost."""
    try:
        delta.save(path)
        return
    except OSError as err:
        reason = err.strerror or str(err)
    handle, fallback = tempfile.mkstemp(prefix="factedit-edit-", suffix=".safetensors")
    os.close(handle)
    try:
        delta.save(fallback)
    except OSError as err:
        Path(fallback).unlink(missing_ok=True)
        raise CommandError(f"could not save the edit to {path} ({reason}), nor to a temporary file "
                           f"({err.strerror or err}); the edit is lost") from None
    raise CommandError(f"could not save the edit to {path} ({reason}); saved it to {fallback} instead")


@click.command()
@model_options
@click.option("--edits", "-e", multiple=True, type=click.Path(dir_okay=False), help="edit files to apply")
@click.option("--history", type=click.Path(file_okay=False), default=None, help=HISTORY_HELP)
@click.option("--prompt", "-p", required=True, multiple=True)
@click.option("--max-new", type=COUNT, default=20, show_default=True)
def generate(model, edits, history, prompt, max_new):
    """Greedy continuation of prompts, with edit files (or a history) applied."""
    from ..generate import greedy_continuation

    lm = model.load()
    load_edits(lm, edits, history)
    for text in prompt:
        click.echo(f"{text}{greedy_continuation(lm, text, max_new)}")


@click.command()
@model_options
@click.option("--edits", "-e", multiple=True, type=click.Path(dir_okay=False), help="edit files to apply")
@click.option("--history", type=click.Path(file_okay=False), default=None, help=HISTORY_HELP)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False))
def export(model, edits, history, out):
    """Write the edited model (edit files, or a history, applied) as a Hugging Face folder (save_pretrained)."""
    if not edits and history is None:
        raise CommandError("nothing to export: give edit files (--edits) or a history folder (--history)")
    check_output_folder(Path(out), "write the edited model to")  # before the model loads, not after
    lm = model.load()
    load_edits(lm, edits, history)
    lm.model.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    click.echo(f"wrote the edited model to {out}")


@click.command()
@model_options
@click.option("--layer", type=INDEX, required=True)
@stats_options
@cluster_options
def stats(model, layer, corpus, stats_tokens, cluster):
    """Compute (or load from the cache) the MLP key second moment at a layer. With --cluster, the
    corpus's chunks are shared out over Ray workers and their sums merged: the same cache file."""
    from ..stats import StatisticsSettings, key_statistics

    with cluster_run(cluster, model) as run:  # connected (or refused) before the model loads
        lm = model.load()
        lm.check_layer(layer)
        settings = StatisticsSettings(stats_corpus=corpus, stats_tokens=stats_tokens)
        sum_chunks = None
        if run is not None:
            from ..cluster import sharded_moments

            sum_chunks = sharded_moments(run.pool(lm.fingerprint))
        with PhaseBars() as bars:
            result, path, hit = key_statistics(lm, settings, layer=layer, progress=bars, sum_chunks=sum_chunks)
        if run is not None and not hit:
            click.echo(f"cluster: {run.describe()}", err=True)
    click.echo(f"{'loaded' if hit else 'computed'} C at layer {layer}: {result.count} keys, "
               f"d_mlp {result.sum_outer.shape[0]}, {path}")


@click.command("suggest-layer")
@model_options
@click.option("--facts", type=click.Path(dir_okay=False), default=None)
@click.option("--n", type=COUNT, default=20, show_default=True, help="correctly predicted facts to trace")
@click.option("--samples", type=COUNT, default=10, show_default=True)
@click.option("--window", type=COUNT, default=10, show_default=True)
def suggest_layer(model, facts, n, samples, window):
    """Suggest the layer to edit: trace where MLPs at the subject's tokens carry the fact (the layers
    within 90% of the peak average effect), and take the default layer rule's layer if it lies in
    that site, else the site's layer nearest to it."""
    from ..data.known import load_known_facts
    from ..edit.layers import edit_layer
    from ..trace.average import average_effects

    lm = model.load()
    with stderr_bar(n, "facts traced", "fact") as bar:
        result = average_effects(lm, load_known_facts(facts), "mlp", n=n, samples=samples, window=window,
                                 on_fact=lambda r: bar.update(1 if r["correct"] else 0))
    if result.n_correct == 0:
        raise CommandError("the model predicted none of the facts correctly; cannot suggest a layer")
    classes = [c for c in ("first_subject", "middle_subject", "last_subject") if c in result.effects["mlp"]]
    token_class = max(classes, key=lambda c: result.peak("mlp", c)[1])
    peak_layer, peak = result.peak("mlp", token_class)
    site = result.site("mlp", token_class)
    default, rule = edit_layer(lm)
    layer = min(site, key=lambda candidate: abs(candidate - default))
    curve = ", ".join(f"{v:.3f}" for v in result.effects["mlp"][token_class].mean)
    click.echo(f"average MLP indirect effect at the {token_class.replace('_', ' ')} token by layer (window {window}, "
               f"{result.n_correct} facts, {result.n_skipped} skipped as wrong): {curve}")
    click.echo(f"site: layers {site[0]}-{site[-1]} (within 90% of the peak {peak:.3f} at layer {peak_layer}); "
               f"default layer {default} ({rule}) is {'inside' if default in site else 'outside'} it")
    click.echo(f"suggested layer {layer}: average MLP indirect effect {result.effects['mlp'][token_class].mean[layer]:.3f} "
               f"at the {token_class.replace('_', ' ')} token, over {result.n_correct} facts")