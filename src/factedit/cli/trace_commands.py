"""`factedit trace`, `trace-avg` and `trace-compare`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..cache_files import check_output_file, check_output_folder
from .options import COUNT, OCCURRENCE_HELP, SEED, CommandError, cluster_options, cluster_run, model_options
from .progress_bars import PhaseBars, stderr_bar


def _corruption_options(command):
    """--corrupt and --metric, shared by trace and trace-avg (whose --facts also feeds replacements)."""
    command = click.option("--metric", type=click.Choice(["prob", "logit-diff"]), default="prob", show_default=True,
                           help="what a restoration is scored by: p(answer), or logit(answer) - logit(contrast) "
                                "(the replacement's answer, or the corrupted run's top other token)")(command)
    # the choices are trace.corrupt.CORRUPTIONS, written out: importing factedit.trace would load plotting here
    return click.option("--corrupt", type=click.Choice(["gaussian", "replace"]), default="gaussian",
                        show_default=True,
                        help="Gaussian noise on the subject's embeddings, or its tokens replaced by another "
                             "known subject of the same token length (seeded)")(command)


def _replacement_pool(facts) -> list[tuple[str, str]]:
    from ..data.known import load_known_facts

    return [(f.subject, f.attribute) for f in load_known_facts(facts)]


@click.command()
@model_options
@click.option("--prompt", "-p", required=True, help='e.g. "The Eiffel Tower is located in the city of"')
@click.option("--subject", "-s", required=True, help="the subject as it occurs in the prompt")
@click.option("--occurrence", type=click.IntRange(min=0), default=None, metavar="N", help=OCCURRENCE_HELP)
@click.option("--kind", default="all", show_default=True,
              help="hidden, mlp, attn, hidden_no_mlp, hidden_no_attn, a comma list, or all (= hidden,mlp,attn)")
@click.option("--sever", is_flag=True, help="also compute the severed kinds (hidden_no_mlp, hidden_no_attn)")
@click.option("--noise", type=click.FloatRange(min=0), default=None, help="noise std (default: 3 x embedding std)")
@click.option("--samples", type=COUNT, default=10, show_default=True)
@click.option("--window", type=COUNT, default=10, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--answer", default=None, help="trace this answer's first token instead of the top prediction")
@click.option("--facts", type=click.Path(dir_okay=False), default=None,
              help="--corrupt replace: the known-facts JSON whose subjects replace this one "
                   "(default: $FACTEDIT_DATA_DIR/known_1000.json or the published file)")
@_corruption_options
@click.option("--approx", type=click.Choice(["atp"]), default=None,
              help="estimate every cell by attribution patching (one forward and backward pass) instead of "
                   "restoring each exactly")
@click.option("--refine", type=COUNT, default=None, metavar="K",
              help="with --approx: compute the K cells the estimate ranks highest exactly, and report disagreements")
@click.option("--out", "-o", type=click.Path(file_okay=False), default="trace-out", show_default=True)
def trace(model, prompt, subject, occurrence, kind, sever, noise, samples, window, seed, answer, corrupt, metric,
          facts, approx, refine, out):
    """Causal tracing of one fact: heatmaps of where the model recalls it."""
    from ..trace.atp import refine_summary
    from ..trace.corrupt import check_corruption
    from ..trace.heatmap import expand_kinds
    from ..trace.plot import plot_heatmap
    from ..trace.runs import prepare
    from ..trace.tracing import check_trace_options, heatmaps

    if refine and not approx:  # said in the command's own words; the library says it in its own
        raise CommandError("--refine confirms an estimate: use it with --approx atp")
    check_corruption(corrupt, noise, command_line=True)  # before the model loads
    kinds = expand_kinds(kind) + (["hidden_no_mlp", "hidden_no_attn"] if sever else [])
    check_trace_options(kinds, approx, refine)
    check_output_folder(Path(out), "write the heatmaps to")
    lm = model.load()
    run = prepare(lm, prompt, subject, occurrence=occurrence, samples=samples, noise=noise, seed=seed,
                  answer=answer, corrupt=corrupt,
                  replacements=_replacement_pool(facts) if corrupt == "replace" else None, metric=metric)
    corruption = (f"noise std {run.noise_std:.4f}" if corrupt == "gaussian"
                  else f"subject replaced by {', '.join(repr(r) for r in run.replacements)}")
    scores = (f"p_clean {run.p_clean:.4f}  p_corrupt {run.p_corrupt:.4f}" if metric == "prob"
              else f"logit diff clean {run.p_clean:.4f}  corrupted {run.p_corrupt:.4f}")
    click.echo(f"answer {run.answer!r}  {scores}  ({corruption}; {run.samples} samples, seed {seed})")
    start, end = run.tokenized.subject_range
    click.echo(f"subject tokens {start}..{end - 1}: {run.tokenized.tokens[start:end]}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with PhaseBars() as bars:
        results = heatmaps(run, kinds, window=window, approx=approx, refine=refine, progress=bars)
    summaries = {k: refine_summary(r, r.extra["refined"]) for k, r in results.items() if "refined" in r.extra}
    for k, result in results.items():
        result.save(out_dir / f"trace_{k}.json")
        plot_heatmap(result, out_dir / f"trace_{k}")
        click.echo(result.summary())
        if k in summaries:
            click.echo(summaries[k])
    click.echo(f"wrote {', '.join(f'trace_{k}.json/.png/.svg' for k in kinds)} to {out_dir}"
               + (" (estimates: attribution patching)" if approx else ""))


@click.command("trace-avg")
@model_options
@click.option("--facts", type=click.Path(dir_okay=False), default=None,
              help="known-facts JSON (default: $FACTEDIT_DATA_DIR/known_1000.json or the published file)")
@click.option("--n", type=COUNT, default=100, show_default=True, help="number of correctly predicted facts to trace")
@click.option("--kind", default="all", show_default=True)
@click.option("--noise", type=click.FloatRange(min=0), default=None,
              help="noise std (default: 3 x std of subject embeddings)")
@click.option("--samples", type=COUNT, default=10, show_default=True)
@click.option("--window", type=COUNT, default=10, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@_corruption_options
@click.option("--approx", type=click.Choice(["atp"]), default=None,
              help="average attribution-patching estimates instead of exact restorations")
@click.option("--out", "-o", type=click.Path(file_okay=False), default="trace-avg-out", show_default=True)
@cluster_options
def trace_avg(model, facts, n, kind, noise, samples, window, seed, corrupt, metric, approx, out, cluster):
    """Average indirect effects over many known facts (resumable: reruns skip traced facts). With
    --cluster, facts are traced on Ray workers; facts.jsonl is the same. With --corrupt replace the
    replacement subjects come from the same facts file."""
    from ..data.known import load_known_facts
    from ..trace.average import average_effects
    from ..trace.corrupt import check_corruption
    from ..trace.plot import plot_average

    check_corruption(corrupt, noise, command_line=True)  # before the model loads
    if approx:
        from ..trace.atp import check_approx
        from ..trace.heatmap import expand_kinds

        check_approx(approx, expand_kinds(kind))
    check_output_folder(Path(out), "write the averages to")
    with cluster_run(cluster, model) as run:  # connected (or refused) before the model loads
        lm = model.load()
        records = load_known_facts(facts)
        traced_by = None
        if run is not None:
            from ..cluster import fact_records

            pool = run.pool(lm.fingerprint)
            pool.start()  # the workers load the model while this process measures the noise
            click.echo(f"cluster: {run.describe()}", err=True)
            traced_by = fact_records(pool)
        with stderr_bar(n, "facts traced", "fact") as bar:
            def on_fact(record):
                if record["correct"]:
                    bar.update(1)
                bar.set_postfix(seen=on_fact.seen + 1, wrong=on_fact.wrong + (not record["correct"]))
                on_fact.seen += 1
                on_fact.wrong += not record["correct"]
            on_fact.seen = on_fact.wrong = 0
            result = average_effects(lm, records, kind, n=n, samples=samples, window=window, seed=seed,
                                     noise=noise, corrupt=corrupt, metric=metric, approx=approx or "",
                                     out_dir=out, on_fact=on_fact, records=traced_by)
    out_dir = Path(out)
    (out_dir / "average.json").write_text(json.dumps(result.to_dict(), indent=1))
    if result.n_correct == 0:
        raise CommandError(f"the model predicted none of the {result.n_facts} facts read correctly; nothing to average")
    plot_average(result, out_dir / "average")
    (out_dir / "average.md").write_text(result.markdown() + "\n")
    corruption = (f"noise std {result.settings.noise_std:.4f}" if corrupt == "gaussian"
                  else f"subjects replaced; {result.n_no_replacement} facts had no replacement subject")
    click.echo(f"{result.n_correct} facts traced, {result.n_skipped} skipped because the model's top token was "
               f"wrong, of {result.n_facts} read; {corruption}")
    click.echo(f"average total effect {float(result.total_effect.mean):.3f} "
               f"(+- {float(result.total_effect.ci95):.3f})")
    for k in result.effects:
        for token_class in ("last_subject", "last"):
            if token_class in result.effects[k]:
                layer, value = result.peak(k, token_class)
                click.echo(f"{k:>6} at {token_class:>12}: peak layer {layer}, average indirect effect {value:.3f}")
    click.echo(f"wrote average.json, average.md, average.png/.svg and facts.jsonl to {out_dir}")


@click.command("trace-compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--label", "labels", multiple=True, help="a name per run, in order (default: the folder names)")
@click.option("--n", type=COUNT, default=None, help="the first N traced facts of each run (default: all)")
@click.option("--out", "-o", "stem", required=True, help="write STEM.md and STEM.png/.svg")
def trace_compare(runs, labels, n, stem):
    """Compare trace-avg runs (another corruption, another model) at the same relative depth, as
    shares of each run's total effect; runs still in progress are read as far as they got."""
    from ..trace.compare import comparison_markdown, read_average
    from ..trace.plot import plot_comparison

    if labels and len(labels) != len(runs):
        raise CommandError(f"{len(labels)} --label for {len(runs)} runs; give one per run or none")
    names = labels or [Path(run).name for run in runs]
    if len(set(names)) != len(names):
        raise CommandError(f"two runs share a name ({', '.join(names)}); name them with --label")
    for path in (f"{stem}.md", f"{stem}.png", f"{stem}.svg"):
        check_output_file(Path(path), "write the comparison to")
    results = {name: read_average(run, n) for name, run in zip(names, runs)}
    text = comparison_markdown(results)
    Path(f"{stem}.md").write_text(text + "\n")
    click.echo(text)
    for path in plot_comparison(results, stem):
        click.echo(f"wrote {path}")
