"""Sequential (lifelong) evaluation: batches of edits applied one after another to the same model.

Each batch is edited on the model holding all earlier batches (EditHistory.edit, the one loop for
that), its cases are scored right after it, and the model is measured (lifelong.py: edits kept,
perplexity, known facts kept, norm growth). Once the last batch is in, every case is scored again
("final"). "pre" scores are the unedited model's.

On disk, beside cases/: history/ (each batch's edit, in order, with the keys AlphaEdit preserves),
lifelong.jsonl (one measurement per batch; batch 0 is the unedited model) and pre/ (the unedited
model's scores of the cases not finished yet). A killed run resumes from
them: saved batches are replayed one by one, the cases and measurements missing after each are made
on the model exactly as it stood then, and the run goes on with the same numbers as one without a
break.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from ..data.known import KnownFact
from ..edit.history import EditHistory
from ..errors import InputError
from ..progress import Phases
from ..run_folder import RunFolder, write_json
from ..stats import Corpus
from .cases import case_path, chunks, references_for, score_after_all, score_and_write, scored_after_all
from .datasets import Dataset
from .lifelong import LifelongPoint, LifelongProbe, plot_lifelong
from .metrics import wilson_interval

POINTS_FILE = "lifelong.jsonl"


def read_points(out: Path) -> dict[int, LifelongPoint]:
    """The measurements of a run so far, by batch. A line cut off by a kill, or not a measurement, is
    skipped (RunFolder.records reports it): that batch is measured again on resuming."""
    points = {}
    for record in RunFolder(out).records(POINTS_FILE):
        try:
            point = LifelongPoint.from_dict(record)
        except TypeError:  # not an object, or other fields
            continue
        points[point.batch] = point
    return points


def _append_point(out: Path, point: LifelongPoint) -> None:
    RunFolder(out).append(POINTS_FILE, asdict(point))  # on a line of its own, even after a cut-off one


def _unedited_scores(lm, ds: Dataset, record, out: Path) -> dict:
    """The record's probabilities on the unedited model, kept in pre/ so that a resumed run (the model
    is unedited when it starts) does not compute them again."""
    path = out / "pre" / f"{record.case_id}.json"
    if path.exists():
        return json.loads(path.read_text())
    found = ds.probabilities(lm, record)
    path.parent.mkdir(exist_ok=True)
    write_json(path, found)
    return found


def run_sequential(lm, method: str, ds: Dataset, records: list, out: Path, *, edits_per_batch: int, settings,
                   generation: bool = False, tokens: int = 100, held_out: Corpus | None = None,
                   known: list[KnownFact] | None = None, measure_every: int = 1, phases: Phases | None = None,
                   progress: Callable[[int], None] | None = None) -> list[LifelongPoint]:
    """See the module docstring; the model is measured after every `measure_every`-th batch and the
    last. The model is restored at the end (also after an error)."""
    batches = chunks(records, edits_per_batch)
    points = read_points(out)
    history = EditHistory(lm, out / "history", lock=True)  # one run per folder: a second one is refused
    try:
        if history.pending > len(batches):
            raise InputError(f"{out / 'history'} holds {history.pending} batches, more than the {len(batches)} "
                             "of this run; use another --out")

        def finish() -> list[LifelongPoint]:
            ordered = [points[b] for b in sorted(points)]
            plot_lifelong({method: ordered}, out / "lifelong")
            return ordered

        measured = {0} | {n for n in range(1, len(batches) + 1) if n % measure_every == 0 or n == len(batches)}
        if history.pending == len(batches) and measured <= set(points) and scored_after_all(out, records):
            if progress:  # a finished run, e.g. killed before its summary was written: nothing to replay
                progress(len(records))
            return finish()
        # A batch with any case file missing is scored again whole (a kill can stop it midway).
        pending = [r for batch in batches if any(not case_path(out, r).exists() for r in batch) for r in batch]
        pre = {r.case_id: _unedited_scores(lm, ds, r, out) for r in pending}  # all on the unedited model
        references = {r.case_id: references_for(lm, ds, r, generation, tokens) for r in pending}
        probe = LifelongProbe(lm, [r.request for r in records], held_out=held_out, known=known)
        if 0 not in points:
            points[0] = probe.measure(history, 0, [])
            _append_point(out, points[0])
        done: list = []
        for number, batch in enumerate(batches, 1):
            requests = [r.request for r in batch]
            if history.pending:
                history.replay(1)
                saved = history.batches[-1]
                if saved.requests != [r.to_dict() for r in requests]:
                    raise InputError(f"{out / 'history'}: batch {number} was made for other records than this run's "
                                     f"(cases {batch[0].case_id}..{batch[-1].case_id}); use another --out")
            else:
                history.edit(requests, method, settings, progress=phases)
            done += requests
            if any(not case_path(out, r).exists() for r in batch):
                info = history.batches[-1].info
                score_and_write(lm, ds, out, batch, [pre[r.case_id] for r in batch],
                                [references[r.case_id] for r in batch], generation, tokens,
                                info.get("edit_seconds", 0.0), info.get("diagnostics", []))
            if number not in points and number in measured:
                points[number] = probe.measure(history, number, done)
                _append_point(out, points[number])
            if progress:
                progress(len(batch))
        score_after_all(lm, ds, out, records)
        return finish()
    finally:
        history.release()


def lifelong_table(runs: dict[str, list[LifelongPoint]]) -> str:
    """Markdown: one row per run and measurement; shares with their 95% (Wilson) intervals,
    perplexity also as a ratio to the run's unedited model."""
    lines = ["| run | batch | edits | edits kept (95% CI) | perplexity (x unedited) | known facts kept (95% CI) "
             "| largest norm growth |", "|---|---|---|---|---|---|---|"]

    def share(value, n):
        if value is None:
            return ""
        low, high = wilson_interval(value, n)
        return f"{value:.3f} ({low:.3f}-{high:.3f})"

    for name, points in runs.items():
        unedited = next((p.perplexity for p in points if p.n_edits == 0), None)
        for p in points:
            growth = max(p.norm_growth.values(), default=None)
            perplexity = "" if p.perplexity is None else f"{p.perplexity:.2f}"
            if perplexity and unedited:
                perplexity += f" ({p.perplexity / unedited:.3f})"
            lines.append(f"| {name} | {p.batch} | {p.n_edits} | {share(p.edits_kept, p.n_edits)} | {perplexity} | "
                         f"{share(p.known_kept, p.known_count)} | {'' if growth is None else format(growth, '.3f')} |")
    return "\n".join(lines)
