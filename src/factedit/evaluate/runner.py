"""The resumable evaluation runner: edit, score against the unedited model, write one JSON per case.

Datasets come from one registry (`DATASETS`): each knows how to load its records, which prompts to
score, and how to turn probabilities into the paper's per-record scores. The runner never branches
on dataset or method names.

Layout of an output folder:
    settings.json        method, settings, model, data, options
    cases/<case_id>.json pre (unedited) and post (edited) probabilities and scores; resume skips these
    summary.json         means and 95% CIs, pre and post
    summary.md           the same as a markdown table
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..data.counterfact import CounterFactRecord, load_counterfact
from ..edit import EditDelta, EditStack, edit, get_method
from ..models import LoadedModel, default_cache_dir
from ..data.zsre import ZsreRecord, load_zsre
from ..scoring import target_logprobs, teacher_forced_predictions
from ..generate import generate_batch
from .metrics import aggregate, counterfact_record_scores, generation_entropy, tfidf_consistency, token_accuracy


@dataclass(frozen=True)
class Dataset:
    name: str
    load: Callable[..., list]  # (path=None, n=None) -> records with .case_id and .request
    probabilities: Callable[[LoadedModel, object], dict]  # (lm, record) -> raw numbers to score
    scores: Callable[[dict], dict[str, float]]  # raw numbers -> per-record scores
    # Fluency and consistency (optional): prompts to generate from on the edited model, and prompts
    # whose generations on the unedited model serve as reference texts about the new object.
    generation_prompts: Callable[[object], list[str]] | None = None
    reference_prompts: Callable[[object], list[str]] | None = None


def counterfact_probabilities(lm: LoadedModel, record: CounterFactRecord) -> dict:
    """P(new) and P(true) for every prompt group, all prompts of the record in one batch."""
    groups = {"rewrite": [record.request.text], "paraphrase": record.paraphrase_prompts,
              "neighborhood": record.neighborhood_prompts}
    prompts = [p for ps in groups.values() for p in ps]
    targets = [record.request.target_new, record.request.target_true]
    logp = target_logprobs(lm, prompts * 2, [targets[0]] * len(prompts) + [targets[1]] * len(prompts)).exp().tolist()
    out, i = {"p_new": {}, "p_true": {}}, 0
    for group, ps in groups.items():
        out["p_new"][group] = logp[i:i + len(ps)]
        out["p_true"][group] = logp[len(prompts) + i:len(prompts) + i + len(ps)]
        i += len(ps)
    return out


def zsre_predictions(lm: LoadedModel, record: ZsreRecord) -> dict:
    """Teacher-forced predictions of the new answer on the question and its rephrasing, and of the
    unrelated question's answer (specificity), in one batch."""
    new = record.request.target_new
    pairs = teacher_forced_predictions(lm, [record.request.text, record.paraphrase, record.loc],
                                       [new, new, " " + record.loc_ans.strip()])
    return {group: {"predicted": predicted, "target": target}
            for group, (predicted, target) in zip(("rewrite", "paraphrase", "neighborhood"), pairs)}


def zsre_scores(raw: dict) -> dict[str, float]:
    return {name: token_accuracy(raw[group]["predicted"], raw[group]["target"])
            for name, group in (("efficacy", "rewrite"), ("paraphrase", "paraphrase"), ("specificity", "neighborhood"))}


DATASETS: dict[str, Dataset] = {
    "counterfact": Dataset("counterfact", load_counterfact, counterfact_probabilities,
                           lambda raw: counterfact_record_scores(raw["p_new"], raw["p_true"]),
                           generation_prompts=lambda r: r.generation_prompts,
                           reference_prompts=lambda r: r.attribute_prompts),
    "zsre": Dataset("zsre", load_zsre, zsre_predictions, zsre_scores),
}


def get_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]


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
                   n: int | None = None, edits_per_batch: int = 1, settings=None, generation: bool = False,
                   generation_tokens: int = 100, sequential: bool = False,
                   progress: Callable[[int], None] | None = None) -> dict:
    """Evaluate `method` on the first `n` records. Each batch of records is edited together, scored,
    and the edit reverted, so every case is measured against the unedited model. Finished cases
    (cases/<id>.json) are skipped, so an interrupted run resumes. With `sequential`, edits accumulate
    instead (see `_run_sequential`).

    generation: also generate from the dataset's generation prompts on the edited model and score
    fluency (GE) and consistency (RS*: TF-IDF cosine against the unedited model's generations for
    prompts about other subjects that truly have the new object, a stand-in for the paper's
    Wikipedia reference texts, which are not available offline)."""
    spec, ds = get_method(method), get_dataset(dataset)
    settings = settings or spec.defaults(lm)
    records = ds.load(data, n)
    out = Path(out_dir)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    if generation and ds.generation_prompts is None:
        raise ValueError(f"dataset {dataset} has no generation prompts")
    run_info = {"method": method, "dataset": dataset, "data": str(data) if data else "default", "n": len(records),
                "edits_per_batch": edits_per_batch, "model": lm.name, "fingerprint": lm.fingerprint,
                "settings": settings.to_dict(), "generation": generation, "sequential": sequential,
                "generation_tokens": generation_tokens if generation else None}
    info_path = out / "settings.json"
    if info_path.exists():
        previous = json.loads(info_path.read_text())
        differ = _differences(previous, run_info)
        if differ:
            raise ValueError(f"{out} holds a run with other settings ({'; '.join(differ)}); use another --out")
    info_path.write_text(json.dumps(run_info, indent=1))

    if sequential:
        _run_sequential(lm, method, ds, records, out, edits_per_batch, settings, generation, generation_tokens,
                        progress)
        return summarize(out)
    stack = EditStack(lm)
    for batch in _chunks(records, edits_per_batch):
        if all(_case_path(out, r).exists() for r in batch):
            if progress:
                progress(len(batch))
            continue
        pre = [ds.probabilities(lm, r) for r in batch]
        references = [_references(lm, ds, r, generation, generation_tokens) for r in batch]
        start = time.perf_counter()
        delta, _ = edit(lm, [r.request for r in batch], method, settings)
        edit_seconds = time.perf_counter() - start
        stack.apply(delta)
        try:
            _score_and_write(lm, ds, out, batch, pre, references, generation, generation_tokens, edit_seconds)
        finally:
            stack.revert()
        if progress:
            progress(len(batch))
    return summarize(out)


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


def _score_and_write(lm, ds: Dataset, out: Path, batch, pre, references, generation, tokens, edit_seconds) -> None:
    """Score the batch on the (edited) model as it is now and write one case file each."""
    for record, before, refs in zip(batch, pre, references):
        after = ds.probabilities(lm, record)
        texts = generations(lm, ds.generation_prompts(record), record.case_id, tokens) if generation else []
        post_scores = ds.scores(after)
        if generation:
            post_scores.update(generation_scores(texts, refs))
        case = {"case_id": record.case_id, "request": record.request.to_dict(), "pre": before, "post": after,
                "pre_scores": ds.scores(before), "post_scores": post_scores, "generated": texts, "references": refs,
                "edit_seconds": edit_seconds / len(batch), "batch_size": len(batch)}
        path = _case_path(out, record)
        _write_json(path, case)


def _run_sequential(lm, method, ds: Dataset, records, out: Path, edits_per_batch, settings, generation, tokens,
                    progress) -> None:
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
                delta, _ = edit(lm, [r.request for r in batch], method, settings)
                edit_seconds = time.perf_counter() - start
                stack.apply(delta)
                delta.save(delta_path)
                _score_and_write(lm, ds, out, batch, [pre[r.case_id] for r in batch],
                                 [references[r.case_id] for r in batch], generation, tokens, edit_seconds)
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


def summarize(out_dir: str | Path) -> dict:
    out = Path(out_dir)
    cases = [json.loads(p.read_text()) for p in sorted((out / "cases").glob("*.json"))]
    info = json.loads((out / "settings.json").read_text())
    summary = {"run": out.resolve().name, "method": info["method"], "dataset": info["dataset"], "model": info["model"],
               "cases": len(cases),
               "pre": aggregate([c["pre_scores"] for c in cases]), "post": aggregate([c["post_scores"] for c in cases]),
               "edit_seconds_mean": sum(c["edit_seconds"] for c in cases) / max(len(cases), 1)}
    if cases and all("final_scores" in c for c in cases):
        summary["final"] = aggregate([c["final_scores"] for c in cases])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown_table([summary]) + "\n")
    return summary


def markdown_table(summaries: list[dict],
                   keys=("S", "ES", "PS", "NS", "EM", "PM", "NM", "GE", "RS*", "efficacy", "paraphrase",
                         "specificity")) -> str:
    """One row per run (edited), and an unedited row before the first run of each model, dataset
    and number of cases; means +- 95% CI."""
    present = [k for k in keys if any(k in s["post"] for s in summaries)]
    lines = ["| run | model | method | cases | " + " | ".join(present) + " |",
             "|---|---|---|---|" + "---|" * len(present)]

    def row(label, run, model, cases, scores):
        cells = []
        for k in present:
            if k not in scores:
                cells.append("")
            elif scores[k]["ci95"] is None:  # no CI for the harmonic mean
                cells.append(f"{scores[k]['mean']:.1f}")
            else:
                cells.append(f"{scores[k]['mean']:.1f} +- {scores[k]['ci95']:.1f}")
        return f"| {run} | {model} | {label} | {cases} | " + " | ".join(cells) + " |"

    baselines = set()  # one unedited row per model, dataset and number of cases (runs take the first N records)
    for s in summaries:
        key = (s["model"], s["dataset"], s["cases"])
        if key not in baselines:
            baselines.add(key)
            lines.append(row("unedited", s.get("run", ""), s["model"], s["cases"], s["pre"]))
        lines.append(row(s["method"], s.get("run", ""), s["model"], s["cases"], s["post"]))
        if "final" in s:
            lines.append(row(f"{s['method']}, after all {s['cases']} edits", s.get("run", ""), s["model"], s["cases"],
                             s["final"]))
    return "\n".join(lines)
