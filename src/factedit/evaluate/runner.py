"""The resumable evaluation runner: edit, score against the unedited model, write one JSON per case.

Datasets come from one registry (`DATASETS`): each knows how to load its records, which prompts to
score, and how to turn probabilities into the paper's per-record scores. The runner never branches
on dataset or method names.

Datasets and their scoring: datasets.py. Layout of an output folder:
    settings.json        method, settings, model, data, options
    cases/<case_id>.json pre (unedited) and post (edited) probabilities and scores; resume skips these
    summary.json         means and 95% CIs, pre and post
    summary.md           the same as a markdown table
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

from ..edit import EditDelta, EditStack, edit, get_method
from ..errors import InputError
from ..generate import generate_batch
from ..models import LoadedModel, default_cache_dir
from ..progress import Phases
from ..tokens import check_prompt_length
from .datasets import Dataset, get_dataset
from .metrics import aggregate, generation_entropy, tfidf_consistency


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def generations(lm: LoadedModel, prompts: list[str], seed: int, n_new: int = 100, top_k: int = 5) -> list[str]:
    """Sampled continuations (top-k, seeded), as the paper generated its fluency texts; all prompts
    in one batch."""
    if not prompts:
        return []
    prompt_ids = [list(lm.tokenizer(prompt)["input_ids"]) for prompt in prompts]
    out = generate_batch(lm, prompt_ids, n_new, top_k=top_k, seed=seed)
    return [lm.tokenizer.decode(row, skip_special_tokens=True) for row in out]


def generation_scores(generated: list[str], references: list[str]) -> dict[str, float]:
    """GE (generation entropy) and RS* (TF-IDF consistency against the stand-in references), as
    fractions of the paper's x100 scale (the summary multiplies by 100)."""
    scores = {"GE": generation_entropy(generated) / 100}
    if references:
        scores["RS*"] = tfidf_consistency(generated, references) / 100
    return scores


def run_evaluation(lm: LoadedModel, method: str, dataset: str, out_dir: str | Path, *, data: str | None = None,
                   n: int | None = None, start: int = 0, edits_per_batch: int = 1, settings=None,
                   generation: bool = False,
                   generation_tokens: int = 100, sequential: bool = False,
                   progress: Callable[[int], None] | None = None, phases: Phases | None = None) -> dict:
    """Evaluate `method` on `n` records from the `start`-th (default: the first n). Each batch of
    records is edited together, scored, and the edit reverted, so every case is measured against the
    unedited model. Finished cases (cases/<id>.json) are skipped, so an interrupted run resumes.
    With `sequential`, edits accumulate instead (see `_run_sequential`).

    generation: also generate from the dataset's generation prompts on the edited model and score
    fluency (GE) and consistency (RS*: TF-IDF cosine against the unedited model's generations for
    prompts about other subjects that truly have the new object, a stand-in for the paper's
    Wikipedia reference texts, which are not available offline)."""
    spec, ds = get_method(method), get_dataset(dataset)
    settings = settings or spec.defaults(lm)
    if start < 0:
        raise InputError(f"start must be 0 or more, not {start}")
    if n is not None and n < 1:
        raise InputError(f"n must be at least 1 (or None: every record), not {n}")
    if edits_per_batch < 1:
        raise InputError(f"edits_per_batch must be at least 1, not {edits_per_batch}")
    if generation and ds.generation_prompts is None:
        raise InputError(f"dataset {dataset} has no generation prompts")
    loaded = ds.load(data, start + n if n is not None else None)
    records = loaded[start:]
    if not records:
        raise InputError(f"no {dataset} records to evaluate: start {start} skips all {len(loaded)} records read")
    check_record_prompts(lm, ds, records)
    spec.check_settings(lm, settings)  # before the first case, not after the unedited scores
    out = Path(out_dir)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    run_info = {"method": method, "dataset": dataset, "data": str(data) if data else "default", "n": len(records),
                "start": start,
                "edits_per_batch": edits_per_batch, "model": lm.name, "fingerprint": lm.fingerprint,
                "settings": settings.to_dict(), "generation": generation, "sequential": sequential,
                "generation_tokens": generation_tokens if generation else None}
    info_path = out / "settings.json"
    if info_path.exists():
        previous = {"start": 0, **json.loads(info_path.read_text())}  # runs from before --start began at 0
        differ = _differences(previous, run_info)
        if differ:
            raise InputError(f"{out} holds a run with other settings ({'; '.join(differ)}); use another --out")
    info_path.write_text(json.dumps(run_info, indent=1))

    if sequential:
        _run_sequential(lm, method, ds, records, out, edits_per_batch, settings, generation, generation_tokens,
                        phases, progress)
        return summarize(out)
    stack = EditStack(lm)
    for batch in _chunks(records, edits_per_batch):
        if all(_case_path(out, r).exists() for r in batch):
            if progress:
                progress(len(batch))
            continue
        pre = [ds.probabilities(lm, r) for r in batch]
        references = [_references(lm, ds, r, generation, generation_tokens) for r in batch]
        began = time.perf_counter()  # not `start`: that is the first record's index
        delta, diagnostics = edit(lm, [r.request for r in batch], method, settings, progress=phases)
        edit_seconds = time.perf_counter() - began
        stack.apply(delta)
        try:
            _score_and_write(lm, ds, out, batch, pre, references, generation, generation_tokens, edit_seconds,
                             diagnostics)
        finally:
            stack.revert()
        if progress:
            progress(len(batch))
    return summarize(out)


def check_record_prompts(lm: LoadedModel, ds: Dataset, records: list) -> None:
    """Every prompt of every record within the prompt limit (tokens.check_prompt_length), checked
    before the first edit; the message names the case and the field."""
    for record in records:
        for name, prompts in ds.prompts(record).items():
            for i, prompt in enumerate(prompts):
                label = name if len(prompts) == 1 else f"{name}[{i}]"
                check_prompt_length(lm, prompt, f"{ds.name} case {record.case_id}: {label}")


def _differences(previous: dict, current: dict) -> list[str]:
    """'key: old -> new' for each run setting (and method setting) that changed; the count n may."""
    differ = []
    for key in sorted(set(previous) | set(current)):
        old, new = previous.get(key), current.get(key)
        if key == "n" or old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            differ += [f"{key}.{d}" for d in _differences(old, new)]
        else:
            differ.append(f"{key}: {old!r} -> {new!r}")
    return differ


def _write_json(path: Path, value) -> None:
    """Write through a temporary file and rename: a crash never leaves half a file."""
    path.with_suffix(".part").write_text(json.dumps(value))
    path.with_suffix(".part").rename(path)


def _case_path(out: Path, record) -> Path:
    return out / "cases" / f"{record.case_id}.json"


def _references(lm, ds: Dataset, record, generation: bool, tokens: int) -> list[str]:
    """The unedited model's generations for the reference prompts. They do not depend on the method,
    so they are cached on disk, keyed by the model's weights, the prompts, the seed and the length."""
    if not generation:
        return []
    prompts = ds.reference_prompts(record)
    key = hashlib.sha256(json.dumps([prompts, record.case_id, tokens]).encode()).hexdigest()[:16]
    path = default_cache_dir() / "references" / lm.fingerprint / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    texts = generations(lm, prompts, record.case_id, tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, texts)
    return texts


def _per_case(diagnostics: list[dict], n: int) -> list[dict]:
    """One diagnostics dict per case: methods report one per request, or one for the whole batch
    (fine-tuning trains all requests together)."""
    if len(diagnostics) == n:
        return diagnostics
    return [diagnostics[0] if diagnostics else {}] * n


def _score_and_write(lm, ds: Dataset, out: Path, batch, pre, references, generation, tokens, edit_seconds,
                     diagnostics: list[dict]) -> None:
    """Score the batch on the (edited) model as it is now and write one case file each, with what the
    editor reported about each edit (steps, final loss, whether the optimisation converged)."""
    for record, before, refs, info in zip(batch, pre, references, _per_case(diagnostics, len(batch))):
        after = ds.probabilities(lm, record)
        texts = generations(lm, ds.generation_prompts(record), record.case_id, tokens) if generation else []
        post_scores = ds.scores(after)
        if generation:
            post_scores.update(generation_scores(texts, refs))
        case = {"case_id": record.case_id, "request": record.request.to_dict(), "pre": before, "post": after,
                "pre_scores": ds.scores(before), "post_scores": post_scores, "generated": texts, "references": refs,
                "edit_seconds": edit_seconds / len(batch), "batch_size": len(batch), "edit": info}
        path = _case_path(out, record)
        _write_json(path, case)


def _run_sequential(lm, method, ds: Dataset, records, out: Path, edits_per_batch, settings, generation, tokens,
                    phases, progress) -> None:
    """Edits accumulate: each batch is edited on the model that holds all earlier batches, and scored
    there; "pre" scores are still the unedited model's. Each batch's edit is saved in deltas/, so a
    resumed run re-applies finished batches instead of recomputing them. The model is restored at
    the end."""
    (out / "deltas").mkdir(exist_ok=True)
    batches = _chunks(records, edits_per_batch)
    pending = [r for r in records if not _case_path(out, r).exists()]
    pre = {r.case_id: ds.probabilities(lm, r) for r in pending}  # all on the unedited model
    references = {r.case_id: _references(lm, ds, r, generation, tokens) for r in pending}
    stack = EditStack(lm)
    try:
        for batch in batches:
            delta_path = out / "deltas" / f"batch_{batch[0].case_id}.safetensors"
            if all(_case_path(out, r).exists() for r in batch) and delta_path.exists():
                stack.apply(EditDelta.load(delta_path))
            else:
                start = time.perf_counter()
                delta, diagnostics = edit(lm, [r.request for r in batch], method, settings, progress=phases)
                edit_seconds = time.perf_counter() - start
                stack.apply(delta)
                delta.save(delta_path)
                _score_and_write(lm, ds, out, batch, [pre[r.case_id] for r in batch],
                                 [references[r.case_id] for r in batch], generation, tokens, edit_seconds, diagnostics)
            if progress:
                progress(len(batch))
        _score_after_all(lm, ds, out, records)
    finally:
        stack.revert_all()


def _score_after_all(lm, ds: Dataset, out: Path, records) -> None:
    """Score every case again on the model that holds all the edits ("final"): an early edit may be
    undone or damaged by later ones, which the scores taken right after each edit cannot show."""
    for record in records:
        path = _case_path(out, record)
        case = json.loads(path.read_text())
        case["final"] = ds.probabilities(lm, record)
        case["final_scores"] = ds.scores(case["final"])
        _write_json(path, case)


def convergence_counts(cases: list[dict]) -> dict:
    """How many edits optimised a value and how many of those did not reach the early-stop loss
    within their step budget (cases of methods without such an optimisation are not counted)."""
    reported = [c["edit"]["converged"] for c in cases if "converged" in c.get("edit", {})]
    if not reported:
        return {}
    return {"edits_with_convergence": len(reported), "not_converged": sum(not ok for ok in reported)}


def _edited_layer(settings: dict) -> int | None:
    """The layer a method edits (the top one of a range), for plots against depth."""
    layers = settings.get("layers")
    return settings.get("layer", max(layers) if layers else None)


def summarize(out_dir: str | Path) -> dict:
    out = Path(out_dir)
    if not (out / "settings.json").is_file():
        raise InputError(f"{out} is not an evaluation run: it has no settings.json (factedit eval writes one)")
    cases = [json.loads(p.read_text()) for p in sorted((out / "cases").glob("*.json"))]
    info = json.loads((out / "settings.json").read_text())
    settings = info.get("settings", {})
    summary = {"run": out.resolve().name, "method": info["method"], "dataset": info["dataset"], "model": info["model"],
               "preset": settings.get("preset", "default"), "layer": _edited_layer(settings), "cases": len(cases),
               "pre": aggregate([c["pre_scores"] for c in cases]), "post": aggregate([c["post_scores"] for c in cases]),
               "edit_seconds_mean": sum(c["edit_seconds"] for c in cases) / max(len(cases), 1),
               **convergence_counts(cases)}
    if cases and all("final_scores" in c for c in cases):
        summary["final"] = aggregate([c["final_scores"] for c in cases])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown_table([summary]) + "\n")
    return summary


def markdown_table(summaries: list[dict],
                   keys=("S", "ES", "PS", "NS", "EM", "PM", "NM", "GenES", "GenPS", "GenOld", "GE", "RS*", "efficacy",
                         "paraphrase", "specificity", "gen_efficacy", "gen_paraphrase", "gen_old")) -> str:
    """One row per run (edited), and an unedited row before the first run of each model, dataset
    and number of cases; means +- 95% CI. A method run with named settings shows the name
    ("rome (paper)"); "not conv." counts the edits whose value optimisation did not converge."""
    present = [k for k in keys if any(k in s["post"] for s in summaries)]
    convergence = any("not_converged" in s for s in summaries)
    lines = ["| run | model | method | cases | " + " | ".join(present) + (" | not conv." if convergence else "") + " |",
             "|---|---|---|---|" + "---|" * (len(present) + convergence)]

    def row(label, run, model, cases, scores, summary=None):
        cells = []
        for k in present:
            if k not in scores:
                cells.append("")
            elif scores[k]["ci95"] is None:  # no CI for the harmonic mean
                cells.append(f"{scores[k]['mean']:.1f}")
            else:
                cells.append(f"{scores[k]['mean']:.1f} +- {scores[k]['ci95']:.1f}")
        if convergence:
            cells.append(f"{summary['not_converged']} of {summary['edits_with_convergence']}"
                         if summary and "not_converged" in summary else "")
        return f"| {run} | {model} | {label} | {cases} | " + " | ".join(cells) + " |"

    baselines = set()  # one unedited row per model, dataset and number of cases (runs take the first N records)
    for s in summaries:
        key = (s["model"], s["dataset"], s["cases"])
        if key not in baselines:
            baselines.add(key)
            lines.append(row("unedited", s.get("run", ""), s["model"], s["cases"], s["pre"]))
        method = s["method"] if s.get("preset", "default") == "default" else f"{s['method']} ({s['preset']})"
        lines.append(row(method, s.get("run", ""), s["model"], s["cases"], s["post"], s))
        if "final" in s:
            lines.append(row(f"{method}, after all {s['cases']} edits", s.get("run", ""), s["model"], s["cases"],
                             s["final"]))
    return "\n".join(lines)
