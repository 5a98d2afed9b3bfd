"""`factedit eval`, `summarize`, `sequential`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..cache_files import check_output_file, check_output_folder
from .options import (COUNT, INDEX, SETTINGS_HELP, CommandError, choose_settings, cluster_options, cluster_run,
                      lifelong_inputs, model_options, stats_options)
from .progress_bars import PhaseBars, stderr_bar


def _lifelong_options(command):
    command = click.option("--measure-every", type=COUNT, default=1, show_default=True,
                           help="measure the model after every this many batches (and the last)")(command)
    command = click.option("--known", default=None, help="known facts for --sequential runs' measurements "
                           "(default $FACTEDIT_DATA_DIR/known_1000.json)")(command)
    command = click.option("--held-out", default=None, help="corpus whose last 3 documents give the perplexity text "
                           "of --sequential runs (default: the statistics corpus)")(command)
    return command


@click.command()
@model_options
@click.option("--dataset", default="counterfact", show_default=True, help="counterfact or zsre")
@click.option("--data", type=click.Path(dir_okay=False, exists=True), default=None,
              help="dataset file (default: from $FACTEDIT_DATA_DIR)")
@click.option("--n", type=COUNT, default=100, show_default=True, help="edits to apply one after another")
@click.option("--edits-per-batch", type=COUNT, default=1, show_default=True)
@click.option("--method", "methods", multiple=True, default=["rome", "rome-original"], show_default=True,
              help="editing method (repeat the option to compare several)")
@click.option("--layer", type=INDEX, default=None)
@stats_options
@_lifelong_options
@click.option("--out", "-o", type=click.Path(file_okay=False), default="sequential-out", show_default=True)
def sequential(model, dataset, data, n, edits_per_batch, methods, layer, corpus, stats_tokens,
               held_out, known, measure_every, out):
    """Apply many edits one after another with each method (as `eval --sequential`, one run folder
    per method under OUT); plot what they do to the model against the number of edits."""
    from ..edit import get_method
    from ..evaluate.lifelong import plot_lifelong, points_to_dicts
    from ..evaluate.runner import run_evaluation
    from ..evaluate.datasets import get_dataset
    from ..evaluate.sequential import lifelong_table, read_points
    from ..progress import SETUP_PHASES

    specs = {method: get_method(method) for method in methods}  # names refused before the model loads
    get_dataset(dataset)
    check_output_folder(Path(out), "write the runs to")
    lm = model.load()
    text, facts = lifelong_inputs(held_out, corpus, known)
    out_dir = Path(out)
    results = {}
    for method in methods:
        settings = specs[method].settings_with(lm, layer, stats_corpus=corpus, stats_tokens=stats_tokens)
        with PhaseBars(only=SETUP_PHASES) as phases, stderr_bar(n, f"{method} edits", "edit") as bar:
            run_evaluation(lm, method, dataset, out_dir / method, data=data, n=n, edits_per_batch=edits_per_batch,
                           settings=settings, sequential=True, held_out=text, known=facts,
                           measure_every=measure_every, progress=bar.update, phases=phases)
        points = read_points(out_dir / method)
        results[method] = [points[b] for b in sorted(points)]
    (out_dir / "lifelong.json").write_text(json.dumps({m: points_to_dicts(p) for m, p in results.items()}, indent=1))
    for path in plot_lifelong(results, out_dir / "lifelong"):
        click.echo(f"wrote {path}")
    click.echo(lifelong_table(results))


@click.command("eval")
@model_options
@click.option("--method", required=True, help="an editing method (see factedit methods)")
@click.option("--dataset", required=True, help="counterfact or zsre")
@click.option("--data", type=click.Path(dir_okay=False, exists=True), default=None,
              help="dataset file (default: from $FACTEDIT_DATA_DIR)")
@click.option("--n", type=COUNT, default=None, help="first N records (default: every record)")
@click.option("--start", type=INDEX, default=0, show_default=True,
              help="skip this many records first (e.g. a held-out slice for tuning)")
@click.option("--edits-per-batch", type=COUNT, default=1, show_default=True)
@click.option("--layer", type=INDEX, default=None)
@click.option("--settings", "settings_file", default=None, help=SETTINGS_HELP)
@stats_options
@click.option("--generation", is_flag=True, help="also score fluency (GE) and consistency (RS*) of generations")
@click.option("--sequential", is_flag=True, help="keep every edit: each batch is edited on top of the earlier ones, "
              "and the model is measured after each (lifelong.jsonl, lifelong.png)")
@_lifelong_options
@click.option("--generation-tokens", type=COUNT, default=100, show_default=True)
@click.option("--out", "-o", type=click.Path(file_okay=False), required=True)
@cluster_options
def eval_command(model, method, dataset, data, n, start, edits_per_batch, layer, settings_file,
                 corpus, stats_tokens, generation, generation_tokens, sequential, held_out, known, measure_every,
                 out, cluster):
    """Evaluate an editing method with the paper's metrics (resumable: finished cases are kept).
    With --cluster, batches of records run on Ray workers; the files written are the same."""
    from ..edit import get_method
    from ..evaluate.datasets import get_dataset
    from ..evaluate.runner import markdown_table, run_evaluation
    from ..progress import SETUP_PHASES

    spec = get_method(method)  # names refused before the model loads
    get_dataset(dataset)
    if cluster is not None and sequential:
        raise CommandError("--cluster cannot run --sequential: each batch is edited on top of the ones before it, "
                           "so batches cannot run apart; drop one of the two")
    check_output_folder(Path(out), "write the run to")
    chosen = choose_settings(spec, settings_file, layer, stats_corpus=corpus, stats_tokens=stats_tokens)
    with cluster_run(cluster, model) as run:  # connected (or refused) before the model loads
        lm = model.load()
        settings = chosen.for_model(lm)
        text, facts = lifelong_inputs(held_out, corpus, known) if sequential else (None, None)
        dispatch = None
        if run is not None:
            from ..cluster import evaluation_dispatch

            pool = run.pool(lm.fingerprint)
            pool.start()  # the workers load the model while this process runs the first batch
            click.echo(f"cluster: {run.describe()}", err=True)
            dispatch = evaluation_dispatch(pool)
        # The statistics and prefixes (minutes when not cached) get bars of their own; per-edit phases do not.
        with PhaseBars(only=SETUP_PHASES) as phases, stderr_bar(n, f"{method} on {dataset}", "case") as bar:
            summary = run_evaluation(lm, method, dataset, out, data=data, n=n, start=start,
                                     edits_per_batch=edits_per_batch, settings=settings, generation=generation,
                                     generation_tokens=generation_tokens, sequential=sequential, held_out=text,
                                     known=facts, measure_every=measure_every, progress=bar.update, phases=phases,
                                     dispatch=dispatch)
        if run is not None and run.workers.reruns:
            click.echo(f"cluster: {run.workers.reruns} batch(es) ran again after {run.workers.deaths} worker(s) died",
                       err=True)
    click.echo(markdown_table([summary]))
    click.echo(f"wrote cases/, summary.json and summary.md to {out}")


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--plot", "bars_stem", default=None, help="also plot ES/PS/NS per run as bars to PLOT.png/.svg")
@click.option("--plot-by-edits", "edits_stem", default=None,
              help="also plot ES/PS/NS against the number of edits per run to PLOT.png/.svg (mass editing)")
@click.option("--plot-by-layer", "layer_stem", default=None,
              help="also plot ES/PS/NS against the edited layer to PLOT.png/.svg (one line per model and method)")
@click.option("--plot-lifelong", "lifelong_stem", default=None,
              help="also print what the --sequential runs' edits did to the model after each batch, and plot it "
                   "against the number of edits to PLOT.png/.svg (one line per run)")
def summarize(runs, bars_stem, edits_stem, layer_stem, lifelong_stem):
    """Print several evaluation runs side by side."""
    from ..evaluate.lifelong import plot_lifelong
    from ..evaluate.plots import plot_by_layer, plot_by_number_of_edits, plot_score_bars
    from ..evaluate.runner import markdown_table, summarize as summarize_run
    from ..evaluate.sequential import lifelong_table, read_points

    for stem in (bars_stem, edits_stem, layer_stem, lifelong_stem):
        for path in (f"{stem}.png", f"{stem}.svg") if stem else ():
            check_output_file(Path(path), "write the plot to")  # before the runs are read
    summaries = [summarize_run(run) for run in runs]
    click.echo(markdown_table(summaries))
    if lifelong_stem:
        measured = {Path(run).name: read_points(Path(run)) for run in runs}
        measured = {name: [points[b] for b in sorted(points)] for name, points in measured.items() if points}
        if not measured:
            raise CommandError("--plot-lifelong needs runs made with --sequential (none has lifelong.jsonl)")
        click.echo("")
        click.echo(lifelong_table(measured))
        for path in plot_lifelong(measured, lifelong_stem):
            click.echo(f"wrote {path}")
    for stem, plot in ((bars_stem, plot_score_bars), (edits_stem, plot_by_number_of_edits),
                       (layer_stem, plot_by_layer)):
        if stem:
            for path in plot(summaries, stem):
                click.echo(f"wrote {path}")
