"""`factedit eval`, `summarize`, `sequential`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from tqdm import tqdm

from . import COUNT, INDEX, SETTINGS_HELP, CommandError, _load, _model_options, _settings, _stats_options, main
from .edit_commands import PhaseBars


@main.command()
@_model_options
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="CounterFact file (default $FACTEDIT_DATA_DIR/counterfact/counterfact_dev.json)")
@click.option("--n", type=COUNT, default=100, show_default=True, help="edits to apply one after another")
@click.option("--every", type=COUNT, default=10, show_default=True, help="measure after this many edits")
@click.option("--method", "methods", multiple=True, type=click.Choice(["rome", "rome-original"]),
              default=["rome", "rome-original"], show_default=True)
@click.option("--layer", type=INDEX, default=None)
@_stats_options
@click.option("--held-out", default=None, help="corpus whose last 3 documents give the perplexity text "
                                                "(default: the statistics corpus)")
@click.option("--out", "-o", type=click.Path(file_okay=False), default="sequential-out", show_default=True)
def sequential(model, device, dtype, threads, data, n, every, methods, layer, corpus, stats_tokens, held_out, out):
    """Apply many edits one after another; track efficacy and held-out perplexity."""
    from ..data.counterfact import load_counterfact
    from ..edit import get_method
    from ..evaluate.sequential import plot_sequential, points_to_dicts, sequential_editing
    from ..stats import held_out_corpus

    if not (held_out or corpus):
        raise CommandError("give --held-out or --corpus: perplexity needs held-out text")
    lm = _load(model, device, dtype, threads)
    records = load_counterfact(data, n)
    ppl_corpus = held_out_corpus(held_out or corpus)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for method in methods:
        settings = get_method(method).settings_with(lm, layer, stats_corpus=corpus, stats_tokens=stats_tokens)
        # The statistics and prefixes (minutes when not cached) as phases before the edits' bar.
        with PhaseBars() as phases, tqdm(total=len(records), desc=f"{method} edits", unit="edit",
                                         file=sys.stderr) as bar:
            results[method] = sequential_editing(
                lm, records, method, settings, ppl_corpus, every=every, progress=bar.update, phases=phases,
                on_point=lambda p: bar.write(f"{method}: {p.n_edits} edits, efficacy {p.efficacy:.2f}, "
                                             f"perplexity {p.perplexity:.1f}"))
        settings.save(out_dir / f"settings_{method}.json")
    (out_dir / "sequential.json").write_text(json.dumps({m: points_to_dicts(p) for m, p in results.items()}, indent=1))
    plot_sequential(results, out_dir / "sequential")
    click.echo("| edits | " + " | ".join(f"{m} efficacy | {m} perplexity" for m in results) + " |")
    click.echo("|---|" + "---|---|" * len(results))
    for i in range(len(next(iter(results.values())))):
        row = [results[m][i] for m in results]
        click.echo(f"| {row[0].n_edits} | " + " | ".join(f"{p.efficacy:.2f} | {p.perplexity:.1f}" for p in row) + " |")
    click.echo(f"wrote sequential.json and sequential.png/.svg to {out_dir}")



@main.command("eval")
@_model_options
@click.option("--method", required=True, help="an editing method (see factedit methods)")
@click.option("--dataset", required=True, help="counterfact or zsre")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="dataset file (default: from $FACTEDIT_DATA_DIR)")
@click.option("--n", type=COUNT, default=None, help="first N records (default: every record)")
@click.option("--start", type=INDEX, default=0, show_default=True,
              help="skip this many records first (e.g. a held-out slice for tuning)")
@click.option("--edits-per-batch", type=COUNT, default=1, show_default=True)
@click.option("--layer", type=INDEX, default=None)
@click.option("--settings", "settings_file", default=None, help=SETTINGS_HELP)
@_stats_options
@click.option("--generation", is_flag=True, help="also score fluency (GE) and consistency (RS*) of generations")
@click.option("--sequential", is_flag=True, help="keep every edit: each batch is edited on top of the earlier ones")
@click.option("--generation-tokens", type=COUNT, default=100, show_default=True)
@click.option("--out", "-o", type=click.Path(file_okay=False), required=True)
def eval_command(model, device, dtype, threads, method, dataset, data, n, start, edits_per_batch, layer, settings_file,
                 corpus, stats_tokens, generation, generation_tokens, sequential, out):
    """Evaluate an editing method with the paper's metrics (resumable: finished cases are kept)."""
    from ..edit import get_method
    from ..evaluate.runner import markdown_table, run_evaluation
    from ..progress import OPTIMISATION

    lm = _load(model, device, dtype, threads)
    spec = get_method(method)
    settings = _settings(spec, lm, settings_file, layer, stats_corpus=corpus, stats_tokens=stats_tokens)
    # The first edit's statistics and prefixes (minutes when not cached) get bars of their own.
    with PhaseBars(skip=(OPTIMISATION,)) as phases, \
            tqdm(total=n, desc=f"{method} on {dataset}", unit="case", file=sys.stderr) as bar:
        summary = run_evaluation(lm, method, dataset, out, data=data, n=n, start=start, edits_per_batch=edits_per_batch,
                                 settings=settings, generation=generation, generation_tokens=generation_tokens,
                                 sequential=sequential, progress=bar.update, phases=phases)
    click.echo(markdown_table([summary]))
    click.echo(f"wrote cases/, summary.json and summary.md to {out}")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--plot", "bars_stem", default=None, help="also plot ES/PS/NS per run as bars to PLOT.png/.svg")
@click.option("--plot-by-edits", "edits_stem", default=None,
              help="also plot ES/PS/NS against the number of edits per run to PLOT.png/.svg (mass editing)")
@click.option("--plot-by-layer", "layer_stem", default=None,
              help="also plot ES/PS/NS against the edited layer to PLOT.png/.svg (one line per model and method)")
def summarize(runs, bars_stem, edits_stem, layer_stem):
    """Print several evaluation runs side by side."""
    from ..evaluate.plots import plot_by_layer, plot_by_number_of_edits, plot_score_bars
    from ..evaluate.runner import markdown_table, summarize as summarize_run

    summaries = [summarize_run(run) for run in runs]
    click.echo(markdown_table(summaries))
    for stem, plot in ((bars_stem, plot_score_bars), (edits_stem, plot_by_number_of_edits),
                       (layer_stem, plot_by_layer)):
        if stem:
            for path in plot(summaries, stem):
                click.echo(f"wrote {path}")
