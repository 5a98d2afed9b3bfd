"""The resumable evaluation runner: edit, score against the unedited model, write one JSON per case.

Datasets come from one registry (`DATASETS`): each knows how to load its records, which prompts to
score, and how to turn probabilities into the paper's per-record scores. The runner never branches
on dataset or method names.

Datasets and their scoring: datasets.py. Layout of an output folder (a run_folder.RunFolder):
    settings.json        method, settings, model, data, options; the sessions that wrote the folder
    cases/<case_id>.json pre (unedited) and post (edited) probabilities and scores; resume skips these
    summary.json         means and 95% CIs, pre and post
    summary.md           the same as a markdown table
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Iterable

from ..cache_files import file_digest
from ..edit import EditStack, edit, get_method
from ..errors import InputError
from ..models import LoadedModel
from ..progress import Phases
from ..run_folder import UNRECORDED, RunFolder, write_json
from ..tokens import check_prompt_length
from ..data.known import KnownFact
from ..stats import Corpus
from .cases import case_path, chunks, references_for, score_and_write
from .datasets import Dataset, get_dataset
from .metrics import aggregate
from .sequential import read_points, run_sequential

# Run settings added after runs were written: the value those runs had (the data's digest was not
# recorded: any data resumes them, as before it was).
ADDED_LATER = MappingProxyType({"start": 0, "measure_every": 1, "data_digest": UNRECORDED,
                                # fields added to the methods' settings since runs were committed
                                "settings.early_stop_steps": 2})
# Recorded but not compared: a rerun may ask for more cases, and the data is the same when its bytes
# are (data_digest), whatever its path.
MAY_DIFFER = frozenset({"n", "data"})


@dataclass(frozen=True)
class EvaluationOptions:
    """What one evaluation run does, besides the model, its settings and where it runs (see
    run_evaluation, whose arguments these are)."""

    method: str
    dataset: str
    data: str | None = None
    n: int | None = None
    start: int = 0
    edits_per_batch: int = 1
    generation: bool = False
    generation_tokens: int = 100
    sequential: bool = False
    measure_every: int = 1

    def check(self, ds: Dataset, distributed: bool) -> None:
        """An InputError for options no run can have (`distributed`: batches are dispatched to workers)."""
        if self.start < 0:
            raise InputError(f"start must be 0 or more, not {self.start}")
        if self.n is not None and self.n < 1:
            raise InputError(f"n must be at least 1 (or None: every record), not {self.n}")
        if self.edits_per_batch < 1:
            raise InputError(f"edits_per_batch must be at least 1, not {self.edits_per_batch}")
        if self.measure_every < 1:
            raise InputError(f"measure_every must be at least 1 (batches), not {self.measure_every}")
        if self.sequential and distributed:
            raise InputError("sequential runs cannot be spread over workers: each batch is edited on top of the "
                             "ones before it (drop --cluster or --sequential)")
        if self.generation and ds.generation_prompts is None:
            raise InputError(f"dataset {self.dataset} has no generation prompts")

    def records(self, ds: Dataset) -> list:
        """The records to evaluate: n of them (default: all) from the start-th of the data."""
        loaded = ds.load(self.data, self.start + self.n if self.n is not None else None)
        records = loaded[self.start:]
        if not records:
            raise InputError(f"no {self.dataset} records to evaluate: start {self.start} skips all "
                             f"{len(loaded)} records read")
        return records

    def run_info(self, lm: LoadedModel, settings, records: list, held_out: Corpus | None,
                 known: list[KnownFact] | None) -> dict:
        """The run's settings.json (what a resumed run must match; see ADDED_LATER and MAY_DIFFER)."""
        data = self.data
        info = {"method": self.method, "dataset": self.dataset, "data": str(data) if data else "default",
                "data_digest": file_digest(Path(data)) if data and Path(data).is_file() else None, "n": len(records),
                "start": self.start,
                "edits_per_batch": self.edits_per_batch, "model": lm.name, "fingerprint": lm.fingerprint,
                "settings": settings.to_dict(), "generation": self.generation, "sequential": self.sequential,
                "generation_tokens": self.generation_tokens if self.generation else None}
        if self.sequential:  # what the measurements after each batch read
            info.update({"held_out": held_out.identity if held_out else None,
                         "known_facts": len(known) if known is not None else None, "measure_every": self.measure_every})
        return info


def run_evaluation(lm: LoadedModel, method: str, dataset: str, out_dir: str | Path, *, data: str | None = None,
                   n: int | None = None, start: int = 0, edits_per_batch: int = 1, settings=None,
                   generation: bool = False,
                   generation_tokens: int = 100, sequential: bool = False, held_out: Corpus | None = None,
                   known: list[KnownFact] | None = None, measure_every: int = 1,
                   progress: Callable[[int], None] | None = None, phases: Phases | None = None,
                   dispatch: Callable[[list[BatchJob]], Iterable[tuple[BatchJob, list[dict]]]] | None = None) -> dict:
    """Evaluate `method` on `n` records from the `start`-th (default: the first n). Each batch of
    records is edited together, scored, and the edit reverted, so every case is measured against the
    unedited model. Finished cases (cases/<id>.json) are skipped, so an interrupted run resumes.
    With `sequential`, edits accumulate instead, and the model is measured after every batch on
    `held_out` text (perplexity) and `known` facts (sequential.py).

    dispatch: runs batches elsewhere (factedit.cluster: on Ray workers) and yields each with its case
    dicts (batch_cases) as they finish; this process writes them. Not with `sequential`: there each
    batch is edited on top of the ones before.

    generation: also generate from the dataset's generation prompts on the edited model and score
    fluency (GE) and consistency (RS*: TF-IDF cosine against the unedited model's generations for
    prompts about other subjects that truly have the new object, a stand-in for the paper's
    Wikipedia reference texts, which are not available offline)."""
    options = EvaluationOptions(method, dataset, data=data, n=n, start=start, edits_per_batch=edits_per_batch,
                                generation=generation, generation_tokens=generation_tokens, sequential=sequential,
                                measure_every=measure_every)
    spec, ds = get_method(method), get_dataset(dataset)
    settings = settings or spec.defaults(lm)
    options.check(ds, distributed=dispatch is not None)
    records = options.records(ds)
    check_record_prompts(lm, ds, records)
    spec.check_settings(lm, settings)  # before the first case, not after the unedited scores
    out = Path(out_dir)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    with RunFolder(out, added_later=ADDED_LATER, may_differ=MAY_DIFFER) as folder:  # one run in it at a time
        folder.start(options.run_info(lm, settings, records, held_out, known))
        if sequential:
            run_sequential(lm, method, ds, records, out, edits_per_batch=edits_per_batch, settings=settings,
                           generation=generation, tokens=generation_tokens, held_out=held_out, known=known,
                           measure_every=measure_every, phases=phases, progress=progress)
        else:
            jobs = [BatchJob(method, dataset, batch, settings, generation, generation_tokens)
                    for batch in chunks(records, edits_per_batch)]
            run_batches(lm, jobs, out, progress=progress, phases=phases, dispatch=dispatch)
        return summarize(out)


def run_batches(lm: LoadedModel, jobs: list[BatchJob], out: Path, *, progress: Callable[[int], None] | None = None,
                phases: Phases | None = None,
                dispatch: Callable[[list[BatchJob]], Iterable[tuple[BatchJob, list[dict]]]] | None = None) -> None:
    """Evaluate the `jobs` whose cases are not all written yet (each batch edited, scored and reverted
    on its own), here or, all but the first, on workers through `dispatch`; `progress` hears of every
    job's records, those already done included."""
    pending = []
    for job in jobs:
        if all(case_path(out, r).exists() for r in job.records):
            if progress:
                progress(len(job.records))
        else:
            pending.append(job)
    # With workers, the first batch runs here first: it fills the method's caches (key statistics,
    # context prefixes, reference texts) that the workers on this machine then read instead of each
    # computing them, while they load the model.
    for job in pending[:1] if dispatch is not None else pending:
        evaluate_batch(lm, job, out, phases)
        if progress:
            progress(len(job.records))
    if dispatch is not None and len(pending) > 1:
        for job, cases in dispatch(pending[1:]):  # as they arrive: a driver stopped midway resumes
            for record, case in zip(job.records, cases):
                write_json(case_path(out, record), case)
            if progress:
                progress(len(job.records))


@dataclass(frozen=True)
class BatchJob:
    """One batch of records to edit together and score: everything a worker needs besides the model."""

    method: str
    dataset: str
    records: list
    settings: object
    generation: bool
    generation_tokens: int


def evaluate_batch(lm: LoadedModel, job: BatchJob, out: Path, phases: Phases | None = None) -> None:
    """Edit the job's records together, score each against the unedited model and write its case
    file to out/cases; the edit is reverted after, so the model is left as it was."""
    ds, batch = get_dataset(job.dataset), job.records
    pre = [ds.probabilities(lm, r) for r in batch]
    references = [references_for(lm, ds, r, job.generation, job.generation_tokens) for r in batch]
    began = time.perf_counter()
    delta, diagnostics = edit(lm, [r.request for r in batch], job.method, job.settings, progress=phases)
    edit_seconds = time.perf_counter() - began
    stack = EditStack(lm)
    stack.apply(delta)
    try:
        score_and_write(lm, ds, out, batch, pre, references, job.generation, job.generation_tokens, edit_seconds,
                         diagnostics)
    finally:
        stack.revert()


def batch_cases(lm: LoadedModel, job: BatchJob) -> list[dict]:
    """The job's case files as dicts (written to a scratch folder and read back): what a worker
    sends back, so that only the driver writes into the run's folder, exactly as evaluate_batch would."""
    with tempfile.TemporaryDirectory(prefix="factedit-batch-") as scratch:
        evaluate_batch(lm, job, Path(scratch))
        return [json.loads(case_path(Path(scratch), r).read_text()) for r in job.records]


def check_record_prompts(lm: LoadedModel, ds: Dataset, records: list) -> None:
    """Every prompt of every record within the prompt limit (tokens.check_prompt_length), checked
    before the first edit; the message names the case and the field."""
    for record in records:
        for name, prompts in ds.prompts(record).items():
            for i, prompt in enumerate(prompts):
                label = name if len(prompts) == 1 else f"{name}[{i}]"
                check_prompt_length(lm, prompt, f"{ds.name} case {record.case_id}: {label}")


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
    folder = RunFolder(out, added_later=ADDED_LATER, may_differ=MAY_DIFFER)
    info = folder.settings()
    if info is None:
        raise InputError(f"{out} is not an evaluation run: it has no settings.json (factedit eval writes one)")
    cases = [json.loads(p.read_text()) for p in sorted((out / "cases").glob("*.json"))]
    settings = info.get("settings", {})
    summary = {"run": out.resolve().name, "method": info["method"], "dataset": info["dataset"], "model": info["model"],
               "preset": settings.get("preset", "default"), "layer": _edited_layer(settings), "cases": len(cases),
               "pre": aggregate([c["pre_scores"] for c in cases]), "post": aggregate([c["post_scores"] for c in cases]),
               "edit_seconds_mean": sum(c["edit_seconds"] for c in cases) / max(len(cases), 1),
               **convergence_counts(cases)}
    if cases and all("final_scores" in c for c in cases):
        summary["final"] = aggregate([c["final_scores"] for c in cases])
    points = read_points(out)
    if points:
        summary["lifelong"] = {"first": vars(points[min(points)]), "last": vars(points[max(points)])}
    folder.write_json("summary.json", summary, indent=1)
    folder.write_text("summary.md", markdown_table([summary]) + "\n")
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
