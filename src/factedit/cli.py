"""The `factedit` command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from tqdm import tqdm

from .arch import ArchitectureError
from .data.known import DatasetError
from .edit.delta import EditFileError
from .models import ModelLoadError
from .tokens import PromptError

USER_ERRORS = (ModelLoadError, ArchitectureError, PromptError, DatasetError, EditFileError, ValueError,
               FileNotFoundError)


def _model_options(command):
    command = click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16")(command)
    command = click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu, cuda:0, mps")(command)
    command = click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")(command)
    command = click.option("--model", "-m", default="smollm2-135m", show_default=True,
                           help="bundled name (smollm2-135m, gemma3-270m), model folder, .gguf file or hub id")(command)
    return command


def _load(model: str, device: str, dtype: str, threads: int | None):
    import torch

    from .models import load

    if threads:
        torch.set_num_threads(threads)
    click.echo(f"loading {model} ...", err=True)
    lm = load(model, device=device, dtype=dtype)
    click.echo(f"{lm.name}: {lm.n_layers} layers, d_model {lm.arch.d_model}, d_mlp {lm.arch.d_mlp}, "
               f"fingerprint {lm.fingerprint}", err=True)
    return lm


class FriendlyGroup(click.Group):
    """Turns the errors users cause (bad model name, subject not in prompt, ...) into one line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=FriendlyGroup)
def main():
    """Locate and edit factual associations in transformer language models."""


@main.command()
@_model_options
@click.option("--prompt", "-p", required=True, help='e.g. "The Eiffel Tower is located in the city of"')
@click.option("--subject", "-s", required=True, help="the subject as it occurs in the prompt")
@click.option("--kind", default="all", show_default=True,
              help="hidden, mlp, attn, hidden_no_mlp, hidden_no_attn, a comma list, or all (= hidden,mlp,attn)")
@click.option("--sever", is_flag=True, help="also compute the severed kinds (hidden_no_mlp, hidden_no_attn)")
@click.option("--noise", type=float, default=None, help="noise std (default: 3 x embedding std)")
@click.option("--samples", type=int, default=10, show_default=True)
@click.option("--window", type=int, default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--answer", default=None, help="trace this answer's first token instead of the top prediction")
@click.option("--out", "-o", type=click.Path(file_okay=False), default="trace-out", show_default=True)
def trace(model, device, dtype, threads, prompt, subject, kind, sever, noise, samples, window, seed, answer, out):
    """Causal tracing of one fact: heatmaps of where the model recalls it."""
    from .trace.heatmap import expand_kinds, heatmap
    from .trace.plot import plot_heatmap
    from .trace.runs import prepare

    lm = _load(model, device, dtype, threads)
    kinds = expand_kinds(kind) + (["hidden_no_mlp", "hidden_no_attn"] if sever else [])
    run = prepare(lm, prompt, subject, samples=samples, noise=noise, seed=seed, answer=answer)
    click.echo(f"answer {run.answer!r}  p_clean {run.p_clean:.4f}  p_corrupt {run.p_corrupt:.4f}  "
               f"(noise std {run.noise_std:.4f}, {samples} samples, seed {seed})")
    start, end = run.tokenized.subject_range
    click.echo(f"subject tokens {start}..{end - 1}: {run.tokenized.tokens[start:end]}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = len(kinds) * run.n_tokens * lm.n_layers
    with tqdm(total=cells, desc="tracing", unit="cell", file=sys.stderr) as bar:
        results = {k: heatmap(run, k, window=window, progress=bar.update) for k in kinds}
    for k, result in results.items():
        result.save(out_dir / f"trace_{k}.json")
        plot_heatmap(result, out_dir / f"trace_{k}")
        click.echo(result.summary())
    click.echo(f"wrote {', '.join(f'trace_{k}.json/.png/.svg' for k in kinds)} to {out_dir}")


@main.command("trace-avg")
@_model_options
@click.option("--facts", type=click.Path(dir_okay=False), default=None,
              help="known-facts JSON (default: $FACTEDIT_DATA_DIR/known_1000.json or the published file)")
@click.option("--n", type=int, default=100, show_default=True, help="number of correctly predicted facts to trace")
@click.option("--kind", default="all", show_default=True)
@click.option("--noise", type=float, default=None, help="noise std (default: 3 x std of subject embeddings)")
@click.option("--samples", type=int, default=10, show_default=True)
@click.option("--window", type=int, default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", type=click.Path(file_okay=False), default="trace-avg-out", show_default=True)
def trace_avg(model, device, dtype, threads, facts, n, kind, noise, samples, window, seed, out):
    """Average indirect effects over many known facts (resumable: reruns skip traced facts)."""
    from .data.known import load_known_facts
    from .trace.average import average_effects
    from .trace.plot import plot_average

    lm = _load(model, device, dtype, threads)
    records = load_known_facts(facts)
    with tqdm(total=n, desc="facts traced", unit="fact", file=sys.stderr) as bar:
        def on_fact(record):
            if record["correct"]:
                bar.update(1)
            bar.set_postfix(seen=on_fact.seen + 1, wrong=on_fact.wrong + (not record["correct"]))
            on_fact.seen += 1
            on_fact.wrong += not record["correct"]
        on_fact.seen = on_fact.wrong = 0
        result = average_effects(lm, records, kind, n=n, samples=samples, window=window, seed=seed,
                                 noise=noise, out_dir=out, on_fact=on_fact)
    out_dir = Path(out)
    (out_dir / "average.json").write_text(json.dumps(result.to_dict(), indent=1))
    if result.n_correct == 0:
        raise ValueError(f"the model predicted none of the {result.n_facts} facts read correctly; nothing to average")
    plot_average(result, out_dir / "average")
    (out_dir / "average.md").write_text(result.markdown() + "\n")
    click.echo(f"{result.n_correct} facts traced, {result.n_skipped} skipped because the model's top token was "
               f"wrong, of {result.n_facts} read; noise std {result.settings.noise_std:.4f}")
    click.echo(f"average total effect {float(result.total_effect.mean):.3f} "
               f"(+- {float(result.total_effect.ci95):.3f})")
    for k in result.effects:
        for token_class in ("last_subject", "last"):
            if token_class in result.effects[k]:
                layer, value = result.peak(k, token_class)
                click.echo(f"{k:>6} at {token_class:>12}: peak layer {layer}, average indirect effect {value:.3f}")
    click.echo(f"wrote average.json, average.md, average.png/.svg and facts.jsonl to {out_dir}")



def _load_edits(lm, paths):
    from .edit import EditDelta, EditStack

    stack = EditStack(lm)
    for path in paths:
        delta = EditDelta.load(path)
        stack.apply(delta)
        click.echo(f"applied {path}: {delta.method}, {len(delta.requests)} request(s)", err=True)
    return stack


def _applicable(settings_type, **options) -> dict:
    """The options that this settings dataclass has fields for."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(settings_type)}
    return {key: value for key, value in options.items() if key in names}


@main.command()
def methods():
    """List the editing methods."""
    from .edit import METHODS

    for name, spec in METHODS.items():
        click.echo(f"{name:14} {spec.description}")


def _stats_options(command):
    command = click.option("--tokens", "stats_tokens", type=int, default=100_000, show_default=True,
                           help="corpus tokens for the key statistics")(command)
    command = click.option("--corpus", default=None,
                           help="text/.jsonl file or folder for the key statistics, or 'wikitext' (online); "
                                "default $FACTEDIT_STATS_CORPUS, else text sampled from the model")(command)
    return command


@main.command("edit")
@_model_options
@click.option("--prompt", "-p", required=True, help='template with {} for the subject, or a full prompt')
@click.option("--subject", "-s", required=True)
@click.option("--target", "-t", required=True, help="the new object, e.g. Rome")
@click.option("--true", "target_true", default=None, help="the current object (default: the model's top token)")
@click.option("--method", default="rome", show_default=True,
              help="rome, rome-original, memit, ft, ft-l or kn (see factedit methods)")
@click.option("--layer", type=int, default=None, help="layer to edit (default: per-model structural default)")
@click.option("--settings", "settings_file", type=click.Path(dir_okay=False), default=None,
              help="ROME settings JSON (as written next to results)")
@click.option("--paraphrase", multiple=True, help="extra prompts to check (repeatable)")
@_stats_options
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the sampled context prefixes")
@click.option("--save", type=click.Path(dir_okay=False), default=None, help="write the edit to this .safetensors file")
def edit_command(model, device, dtype, threads, prompt, subject, target, target_true, method, layer, settings_file,
                 paraphrase, corpus, stats_tokens, seed, save):
    """Rewrite one fact with ROME and show the model before and after."""
    from .edit import EditRequest, EditStack, edit, get_method
    from .generate import greedy_continuation, sample_texts
    from .scoring import target_probs

    lm = _load(model, device, dtype, threads)
    request = EditRequest.create(prompt, subject, target, target_true)
    if request.target_true is None:
        top = greedy_continuation(lm, request.text, 1)
        request = EditRequest.create(request.prompt, subject, target, top.strip() or top)
    spec = get_method(method)
    if settings_file:
        settings = spec.settings_type.load(settings_file)
    else:
        settings = spec.defaults(lm, layer, **_applicable(spec.settings_type, stats_corpus=corpus,
                                                          stats_tokens=stats_tokens, prefix_seed=seed))
    where = getattr(settings, "layer", None) if hasattr(settings, "layer") else getattr(settings, "layers", None)
    click.echo(f"editing layer(s) {where} ({getattr(settings, 'layer_rule', '')}) with {method}: "
               f"{request.text!r}: {request.target_true!r} -> {request.target_new!r}")
    prefixes = sample_texts(lm, ["The", "In"], 1, 8, top_k=5, seed=seed + 7)  # not the templates ROME uses
    checks = [request.text] + [f"{p.strip()}. {request.text}" for p in prefixes] + list(paraphrase)
    labels = ["prompt"] + ["prefixed (sampled)"] * len(prefixes) + ["paraphrase"] * len(paraphrase)

    def table():
        new = target_probs(lm, checks, [request.target_new] * len(checks))
        old = target_probs(lm, checks, [request.target_true] * len(checks))
        return new, old

    before = table()
    generation_before = greedy_continuation(lm, request.text, 20)
    with tqdm(desc="editing", unit="step", file=sys.stderr) as bar, \
            tqdm(desc="key statistics", unit="tok", file=sys.stderr, disable=None) as stats_bar:
        delta, diagnostics = edit(lm, request, method, settings, progress=bar.update, stats_progress=stats_bar.update)
    stack = EditStack(lm)
    stack.apply(delta)
    after = table()
    generation_after = greedy_continuation(lm, request.text, 20)
    click.echo(f"{'':22} {'p(' + request.target_true.strip() + ')':>22} {'p(' + request.target_new.strip() + ')':>22}")
    for i, (label, text) in enumerate(zip(labels, checks)):
        click.echo(f"{label:22} {before[1][i]:9.4f} -> {after[1][i]:<9.4f} {before[0][i]:9.4f} -> {after[0][i]:<9.4f}"
                   f"  {text!r}")
    click.echo(f"before: {request.text}{generation_before}".replace("\n", " / "))
    click.echo(f"after:  {request.text}{generation_after}".replace("\n", " / "))
    info = diagnostics[0]
    if "losses" in info:
        click.echo(f"optimisation: {info['steps']} steps, final loss {info['losses'][-1]:.4f}")
    if save:
        delta.save(save)
        click.echo(f"saved the edit to {save}")


@main.command()
@_model_options
@click.option("--edits", "-e", multiple=True, type=click.Path(dir_okay=False), help="edit files to apply")
@click.option("--prompt", "-p", required=True, multiple=True)
@click.option("--max-new", type=int, default=20, show_default=True)
def generate(model, device, dtype, threads, edits, prompt, max_new):
    """Greedy continuation of prompts, with edit files applied."""
    from .generate import greedy_continuation

    lm = _load(model, device, dtype, threads)
    _load_edits(lm, edits)
    for text in prompt:
        click.echo(f"{text}{greedy_continuation(lm, text, max_new)}")


@main.command()
@_model_options
@click.option("--edits", "-e", multiple=True, required=True, type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False))
def export(model, device, dtype, threads, edits, out):
    """Write the edited model as a Hugging Face folder (save_pretrained)."""
    lm = _load(model, device, dtype, threads)
    _load_edits(lm, edits)
    lm.model.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    click.echo(f"wrote the edited model to {out}")


@main.command()
@_model_options
@click.option("--layer", type=int, required=True)
@_stats_options
def stats(model, device, dtype, threads, layer, corpus, stats_tokens):
    """Compute (or load from the cache) the MLP key second moment at a layer."""
    from .edit import RomeSettings
    from .edit.rome import key_statistics

    lm = _load(model, device, dtype, threads)
    settings = RomeSettings.defaults_for(lm, layer, stats_corpus=corpus, stats_tokens=stats_tokens)
    with tqdm(total=stats_tokens, desc="key statistics", unit="tok", file=sys.stderr) as bar:
        result, path, hit = key_statistics(lm, settings, progress=bar.update)
    click.echo(f"{'loaded' if hit else 'computed'} C at layer {layer}: {result.count} keys, "
               f"d_mlp {result.sum_outer.shape[0]}, {path}")


@main.command("suggest-layer")
@_model_options
@click.option("--facts", type=click.Path(dir_okay=False), default=None)
@click.option("--n", type=int, default=20, show_default=True, help="correctly predicted facts to trace")
@click.option("--samples", type=int, default=10, show_default=True)
@click.option("--window", type=int, default=10, show_default=True)
def suggest_layer(model, device, dtype, threads, facts, n, samples, window):
    """Suggest the layer to edit: the peak average MLP effect on the subject's tokens."""
    from .data.known import load_known_facts
    from .trace.average import average_effects

    lm = _load(model, device, dtype, threads)
    with tqdm(total=n, desc="facts traced", unit="fact", file=sys.stderr) as bar:
        result = average_effects(lm, load_known_facts(facts), "mlp", n=n, samples=samples, window=window,
                                 on_fact=lambda r: bar.update(1 if r["correct"] else 0))
    if result.n_correct == 0:
        raise ValueError("the model predicted none of the facts correctly; cannot suggest a layer")
    best = max(((result.peak("mlp", c), c) for c in ("first_subject", "middle_subject", "last_subject")
                if c in result.effects["mlp"]), key=lambda x: x[0][1])
    (layer, value), token_class = best
    click.echo(f"suggested layer {layer}: average MLP indirect effect {value:.3f} at the {token_class.replace('_', ' ')} "
               f"token, over {result.n_correct} facts ({result.n_skipped} skipped as wrong)")



@main.command()
@_model_options
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="CounterFact file (default $FACTEDIT_DATA_DIR/counterfact/counterfact_dev.json)")
@click.option("--n", type=int, default=100, show_default=True, help="edits to apply one after another")
@click.option("--every", type=int, default=10, show_default=True, help="measure after this many edits")
@click.option("--method", "methods", multiple=True, type=click.Choice(["rome", "rome-original"]),
              default=["rome", "rome-original"], show_default=True)
@click.option("--layer", type=int, default=None)
@_stats_options
@click.option("--held-out", default=None, help="corpus whose last 3 documents give the perplexity text "
                                                "(default: the statistics corpus)")
@click.option("--out", "-o", type=click.Path(file_okay=False), default="sequential-out", show_default=True)
def sequential(model, device, dtype, threads, data, n, every, methods, layer, corpus, stats_tokens, held_out, out):
    """Apply many edits one after another; track efficacy and held-out perplexity."""
    from .data.counterfact import load_counterfact
    from .edit import get_method
    from .evaluate.sequential import plot_sequential, points_to_dicts, sequential_editing
    from .stats import held_out_corpus

    lm = _load(model, device, dtype, threads)
    records = load_counterfact(data, n)
    if not (held_out or corpus):
        raise ValueError("give --held-out or --corpus: perplexity needs held-out text")
    ppl_corpus = held_out_corpus(held_out or corpus)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for method in methods:
        settings = get_method(method).defaults(lm, layer, stats_corpus=corpus, stats_tokens=stats_tokens)
        with tqdm(total=len(records), desc=f"{method} edits", unit="edit", file=sys.stderr) as bar:
            results[method] = sequential_editing(
                lm, records, method, settings, ppl_corpus, every=every, progress=bar.update,
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
@click.option("--dataset", required=True, help="counterfact")
@click.option("--data", type=click.Path(dir_okay=False), default=None, help="dataset file (default: from $FACTEDIT_DATA_DIR)")
@click.option("--n", type=int, default=None, help="first N records")
@click.option("--edits-per-batch", type=int, default=1, show_default=True)
@click.option("--layer", type=int, default=None)
@click.option("--settings", "settings_file", type=click.Path(dir_okay=False), default=None)
@click.option("--generation", is_flag=True, help="also score fluency (GE) and consistency (RS*) of generations")
@click.option("--sequential", is_flag=True, help="keep every edit: each batch is edited on top of the earlier ones")
@click.option("--generation-tokens", type=int, default=100, show_default=True)
@click.option("--out", "-o", type=click.Path(file_okay=False), required=True)
def eval_command(model, device, dtype, threads, method, dataset, data, n, edits_per_batch, layer, settings_file,
                 generation, generation_tokens, sequential, out):
    """Evaluate an editing method with the paper's metrics (resumable: finished cases are kept)."""
    from .edit import get_method
    from .evaluate.runner import markdown_table, run_evaluation

    lm = _load(model, device, dtype, threads)
    spec = get_method(method)
    settings = spec.settings_type.load(settings_file) if settings_file else spec.defaults(lm, layer)
    with tqdm(total=n, desc=f"{method} on {dataset}", unit="case", file=sys.stderr) as bar:
        summary = run_evaluation(lm, method, dataset, out, data=data, n=n, edits_per_batch=edits_per_batch,
                                 settings=settings, generation=generation, generation_tokens=generation_tokens,
                                 sequential=sequential, progress=bar.update)
    click.echo(markdown_table([summary]))
    click.echo(f"wrote cases/, summary.json and summary.md to {out}")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
def summarize(runs):
    """Print several evaluation runs side by side."""
    from .evaluate.runner import markdown_table, summarize as summarize_run

    click.echo(markdown_table([summarize_run(run) for run in runs]))



@main.command()
@_model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (local only by default)")
@click.option("--port", type=int, default=8000, show_default=True)
@_stats_options
def serve(model, device, dtype, threads, host, port, corpus, stats_tokens):
    """Start the web workbench: trace, edit and compare the model's facts in the browser."""
    import uvicorn

    from .server.app import create_app
    from .server.workbench import Workbench

    lm = _load(model, device, dtype, threads)
    app = create_app(Workbench(lm, stats_corpus=corpus, stats_tokens=stats_tokens))
    click.echo(f"factedit workbench on http://{host}:{port}/  (API documentation at /docs)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


if __name__ == "__main__":
    main()
