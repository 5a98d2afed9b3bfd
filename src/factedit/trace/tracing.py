"""One fact's heatmaps, exact or estimated: the library's `trace()` and the one choice between
restoring every cell (heatmap.py) and estimating every cell (atp.py) that the CLI, the workbench and
the averaging over facts all make through `heatmaps()`."""

from __future__ import annotations

from ..errors import InputError
from ..models import LoadedModel
from ..progress import Phases, start_phase
from .atp import check_approx, estimated_heatmaps, refine as refine_cells
from .heatmap import TraceResult, expand_kinds, heatmap
from .runs import TraceRun, prepare

TRACING = "tracing"  # the exact heatmaps' phase: one step per restored cell


def estimating(approx: str) -> str:
    """The name of the estimate's phase (one step: one forward and backward pass)."""
    return f"estimating ({approx})"


def check_trace_options(kinds: list[str], approx: str | None = None, refine: int | None = None) -> None:
    """Refuse an estimate the kinds have no form for, or a refinement without an estimate, before any
    work (the CLI and the server call this before the model is busy)."""
    if refine is not None and approx is None:
        raise InputError("refining confirms an estimate's top cells exactly: give an approximation (atp) with it")
    if approx is not None:  # "" too: an empty name is a mistake, not a request for exact tracing
        check_approx(approx, kinds)


def heatmaps(run: TraceRun, kinds: list[str], *, window: int = 10, approx: str | None = None,
             refine: int | None = None, progress: Phases | None = None) -> dict[str, TraceResult]:
    """{kind: TraceResult} for the prepared `run`: exact (one restoration run per cell) without
    `approx`, else the estimate (approx="atp": attribution patching, every cell from one forward and
    backward pass), its results marked with the approximation's name. `refine`: with an estimate,
    also compute its `refine` top cells exactly (atp.refine; the rows in result.extra["refined"])."""
    check_trace_options(kinds, approx, refine)
    if approx is None:
        step = start_phase(progress, TRACING, len(kinds) * run.n_tokens * run.lm.n_layers, "cell")
        return {kind: heatmap(run, kind, window=window, progress=step) for kind in kinds}
    step = start_phase(progress, estimating(approx), 1, "pass")
    results = estimated_heatmaps(run, kinds, window=window, approx=approx)
    step(1)
    if refine:
        for result in results.values():
            refine_cells(run, result, refine)
    return results


def trace(lm: LoadedModel, prompt: str, subject: str, kinds: str | list[str] = "hidden", *, window: int = 10,
          samples: int = 10, noise: float | None = None, seed: int = 0, answer: str | None = None,
          corrupt: str = "gaussian", replacements=None, metric: str = "prob", occurrence: int | None = None,
          approx: str | None = None, refine: int | None = None,
          progress: Phases | None = None) -> dict[str, TraceResult]:
    """Causal tracing of `subject` in `prompt` for each kind in `kinds` ("all" = hidden, mlp, attn).

    Returns {kind: TraceResult}. The clean and corrupted runs (and their noise) are shared by all kinds.
    corrupt, replacements, metric, occurrence (of the subject, from 0): see runs.prepare. approx="atp"
    estimates every cell instead of restoring it, and refine=K confirms the estimate's top K cells
    exactly (see heatmaps). `progress` hears of the tracing phase (factedit.progress).
    """
    kinds = expand_kinds(kinds)
    check_trace_options(kinds, approx, refine)  # before the clean and corrupted runs
    run = prepare(lm, prompt, subject, samples=samples, noise=noise, seed=seed, answer=answer, corrupt=corrupt,
                  replacements=replacements, metric=metric, occurrence=occurrence)
    return heatmaps(run, kinds, window=window, approx=approx, refine=refine, progress=progress)
