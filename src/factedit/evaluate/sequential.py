"""Sequential editing: many ROME edits applied one after another to the same model.

After every `every` edits: the efficacy of all edits so far (share whose new target beats the true
one on its rewrite prompt, and the mean probability margin) and the perplexity of held-out text.
The reference implementation's key mix is known to produce "disabling" edits that collapse the
model after some edits; the consistent-key variant should not.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..data.counterfact import CounterFactRecord
from ..edit import EditStack, RomeSettings, get_method
from ..edit.rome import context_templates, key_statistics, rome_delta
from ..models import LoadedModel
from ..progress import Phases
from ..scoring import target_logprobs
from ..settings import SettingsError
from ..stats import Corpus, token_chunks


@dataclass
class SequentialPoint:
    n_edits: int
    efficacy: float  # share of edits so far with P(new) > P(true) on the rewrite prompt
    margin: float  # mean P(new) - P(true) over them
    perplexity: float
    seconds: float  # wall time since the start


@torch.no_grad()
def perplexity(lm: LoadedModel, corpus: Corpus, n_tokens: int = 4096, chunk_len: int = 256) -> float:
    total_nll, count = 0.0, 0
    for chunk in token_chunks(lm, corpus, n_tokens, chunk_len):
        ids = torch.tensor([chunk], device=lm.device)
        logits = lm.model(input_ids=ids, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total_nll += float(nll)
        count += ids.shape[1] - 1
    mean = total_nll / max(count, 1)
    return math.exp(mean) if mean < 700 else float("inf")  # a collapsed model: report inf, do not crash


def efficacy(lm: LoadedModel, records: list[CounterFactRecord]) -> tuple[float, float]:
    if not records:
        return float("nan"), float("nan")
    prompts = [r.request.text for r in records]
    p_new = target_logprobs(lm, prompts, [r.request.target_new for r in records]).exp()
    p_true = target_logprobs(lm, prompts, [r.request.target_true for r in records]).exp()
    return float((p_new > p_true).float().mean()), float((p_new - p_true).mean())


def sequential_editing(lm: LoadedModel, records: list[CounterFactRecord], method: str, settings: RomeSettings,
                       held_out: Corpus, *, every: int = 10, ppl_tokens: int = 4096,
                       on_point: Callable[[SequentialPoint], None] | None = None,
                       progress: Callable[[int], None] | None = None,
                       phases: Phases | None = None) -> list[SequentialPoint]:
    """Apply the records' edits one by one; measure at 0, every, 2*every, ... edits. The model is
    restored exactly at the end (also after an error). `settings` must be the method's (see
    factedit.edit.get_method(method).defaults)."""
    if settings.key_mode != get_method(method).defaults(lm, settings.layer).key_mode:
        raise SettingsError(f"settings with key_mode {settings.key_mode!r} do not belong to method {method}")
    stats, _, _ = key_statistics(lm, settings, progress=phases)
    C = stats.matrix.to(lm.device)
    templates = context_templates(lm, settings, progress=phases)
    start, points, stack = time.perf_counter(), [], EditStack(lm)

    def measure(n: int):
        eff, margin = efficacy(lm, records[:n])
        point = SequentialPoint(n, eff, margin, perplexity(lm, held_out, ppl_tokens), time.perf_counter() - start)
        points.append(point)
        if on_point:
            on_point(point)

    try:
        measure(0)
        for i, record in enumerate(records, 1):
            delta, _ = rome_delta(lm, record.request, settings, C, templates)
            stack.apply(delta)
            if progress:
                progress(1)
            if i % every == 0 or i == len(records):
                measure(i)
    finally:
        stack.revert_all()
    return points


def points_to_dicts(points: list[SequentialPoint]) -> list[dict]:
    return [asdict(p) for p in points]


def plot_sequential(results: dict[str, list[SequentialPoint]], path_stem) -> list:
    """Efficacy and held-out perplexity against the number of edits, one line per method."""
    from .. import figures

    fig, (left, right) = figures.subplots(1, 2, figsize=(10, 3.6))
    for method, points in results.items():
        n = [p.n_edits for p in points]
        left.plot(n[1:], [p.efficacy for p in points[1:]], marker="o", label=method)
        right.plot(n, [p.perplexity for p in points], marker="o", label=method)
    left.set(xlabel="edits applied", ylabel="efficacy of all edits so far", ylim=(-0.05, 1.05))
    right.set(xlabel="edits applied", ylabel="held-out perplexity", yscale="log")
    left.legend(), right.legend()
    return figures.save(fig, Path(path_stem).with_suffix(""), dpi=130, bbox_inches="tight")
