"""The sequences a person runs, assembled once for every face of factedit: the `factedit` command and
the web workbench only parse their input, call these and show the result.

* `edit_with_report`: rewrite one fact and measure the model around it (the prompt, paraphrases,
  prefixed prompts and a generation, before and after): `factedit edit`, the workbench's Edit.
* `add_batch_with_report`: add one batch of edits on top of a history and measure the new edits, the
  earlier ones and the protected facts before and after, optionally under a guard that refuses a
  batch costing the model too much: `factedit history edit [--guard ...]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .data.known import KnownFact
from .edit import EditDelta, EditHistory, EditStack, edit, get_method
from .evaluate.guard import BatchCost, Guard
from .evaluate.lifelong import answered
from .generate import with_current_target
from .models import LoadedModel
from .progress import Phases
from .report import EditReport, checks_for, report_around
from .request import EditRequest
from .scoring import target_probs


@dataclass(frozen=True)
class ReportedEdit:
    """An edit made and applied, with the report of the model around it."""

    request: EditRequest  # as edited: with its current target (target_true) filled in
    delta: EditDelta
    diagnostics: list[dict]  # per request, the method's (e.g. how its value optimisation ended)
    report: EditReport
    lines: list[str]  # what the method has to say beyond the report (Method.report_lines)
    applied: object = None  # what `apply` returned (the workbench's record of the applied edit)


def edit_with_report(lm: LoadedModel, request: EditRequest, method: str = "rome", settings=None, *,
                     paraphrases: list[str] = (), seed: int = 0, progress: Phases | None = None,
                     apply: Callable[[EditDelta], object] | None = None) -> ReportedEdit:
    """Fill in the request's current target (the model's next token, where none is given), measure
    the report's checks (report.checks_for, seeded by `seed`), compute the edit with `method` and
    `settings` (per-model defaults if None), apply it, measure again. The edit stays applied:
    `apply(delta)` applies it (default: a new EditStack(lm).apply; the workbench passes its own to
    keep a record); if computing or applying fails the model is left as it was."""
    spec = get_method(method)
    request = with_current_target(lm, request)
    settings = spec.defaults(lm) if settings is None else settings
    apply = apply or EditStack(lm).apply

    def make_edit():
        delta, diagnostics = edit(lm, request, method, settings, progress=progress)
        return delta, diagnostics, apply(delta)

    checks = checks_for(lm, request, list(paraphrases), seed=seed)
    report, (delta, diagnostics, applied) = report_around(lm, request, checks, make_edit)
    return ReportedEdit(request, delta, diagnostics, report, spec.report_lines(delta, diagnostics, settings), applied)


Preference = tuple[float, float]  # (p(target_true), p(target_new)) on a request's own prompt


def preference(lm: LoadedModel, requests: list[EditRequest]) -> list[Preference]:
    """(p(target_true), p(target_new)) on each request's own prompt."""
    if not requests:
        return []
    prompts = [r.text for r in requests]
    old = target_probs(lm, prompts, [r.target_true for r in requests])
    new = target_probs(lm, prompts, [r.target_new for r in requests])
    return list(zip(old, new))


def preferred_count(scores: list[Preference]) -> int:
    """How many requests' prompts prefer the new object."""
    return sum(new > old for old, new in scores)


def answered_count(lm: LoadedModel, facts: list[EditRequest]) -> int:
    """How many facts (requests whose target_new is the answer, as a protection batch keeps them) the
    model answers (evaluate.lifelong.answered)."""
    return sum(answered(lm, [KnownFact(i, f.subject, f.target_new, f.text) for i, f in enumerate(facts)]))


@dataclass(frozen=True)
class BatchReport:
    """One batch added to a history, and how the model answered before and after it."""

    requests: list[EditRequest]  # the batch, with current targets filled in on the model the history left
    delta: EditDelta
    diagnostics: list[dict]
    new_before: list[Preference]
    new_after: list[Preference]
    earlier: list[EditRequest]  # what earlier batches edited (those saved with their old object)
    earlier_before: list[Preference]
    earlier_after: list[Preference]
    protected: list[EditRequest]  # the facts protection batches keep
    protected_before: int  # of them answered
    protected_after: int
    batch_number: int  # the batch's number in the history, from 1
    saved: Path | None  # its file, for a history kept in a folder
    lines: list[str]  # what the method has to say beyond the report (Method.report_lines)
    cost: BatchCost | None = None  # what the batch did to the guard's probe (with a guard)


def add_batch_with_report(history: EditHistory, requests: list[EditRequest], method: str = "alphaedit",
                          settings=None, *, progress: Phases | None = None, guard: Guard | None = None) -> BatchReport:
    """Edit `requests` as one more batch on top of `history` (replayed first where it has batches
    not yet applied) and keep it there (saved, for a history in a folder); measure the batch's
    prompts, the earlier edits and the protected facts before and after. With a `guard`
    (evaluate.guard), the batch is kept only within its limits, else GuardRefused and nothing
    changed. The caller holds the history's lock (EditHistory(..., lock=True)) where another process
    might write it."""
    lm = history.lm
    if history.pending:
        history.replay()
    spec = get_method(method)
    settings = spec.defaults(lm) if settings is None else settings
    requests = [with_current_target(lm, r) for r in requests]  # on the model as the history left it
    # A request saved without its old object cannot be scored against it.
    earlier = [EditRequest.from_dict(r) for batch in history.batches if batch.method != "protect"
               for r in batch.requests if r.get("target_true")]
    protected = [EditRequest.from_dict(r) for batch in history.batches if batch.method == "protect"
                 for r in batch.requests]
    new_before, earlier_before = preference(lm, requests), preference(lm, earlier)
    protected_before = answered_count(lm, protected)
    cost = None
    if guard is None:
        delta, diagnostics = history.edit(requests, method, settings, progress=progress)
    else:
        delta, diagnostics, cost = guard.edit(history, requests, method, settings, progress=progress)
    return BatchReport(requests, delta, diagnostics, new_before, preference(lm, requests), earlier, earlier_before,
                       preference(lm, earlier), protected, protected_before, answered_count(lm, protected),
                       len(history), history.saved_files[-1] if history.saved_files else None,
                       spec.report_lines(delta, diagnostics, settings), cost)
