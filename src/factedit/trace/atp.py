"""Attribution patching: every heatmap cell estimated from one corrupted forward and backward pass.

Restoring a state s at (token t, layer l) changes the metric m by about (s_clean - s_corrupt) .
dm/ds, the gradient taken in the corrupted run (Nanda 2023; AtP*, Kramar et al. 2024, arXiv
2403.00745). One backward pass gives the gradient at every (token, layer) at once, so a heatmap costs
one forward and one backward pass of the noise samples instead of one restoration run per cell. A
window of MLP or attention layers is estimated by the sum of its layers' terms (first order, the
terms add). The estimate is exact where m is linear in s along the patch, and misses where the path
saturates (a softmax that is already near 0 or 1 responds less to a large change than its gradient
says) or where effects cancel (AtP* names both). `refine` computes the cells the estimate ranks
highest exactly, to confirm it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError
from ..hooks import Hook, Hooks
from .heatmap import TraceResult, result_of
from .restore import heatmap_cells, restored_probs, window_layers
from .runs import TraceRun, as_batch_seq, last_token_logits

APPROXIMATIONS = ("atp",)
ESTIMATED_KINDS = ("hidden", "mlp", "attn")  # severing (hidden_no_*) has no first-order form here
DISAGREE_SHARE = 0.25  # refine: estimate and exact disagree when further apart than this share of the total effect


def check_approx(approx: str, kinds: list[str]) -> None:
    if approx not in APPROXIMATIONS:
        raise InputError(f"unknown approximation {approx!r}; choose {', '.join(APPROXIMATIONS)} (or none: exact)")
    for kind in kinds:
        if kind not in ESTIMATED_KINDS:
            raise InputError(f"approximation {approx!r} estimates the kinds {', '.join(ESTIMATED_KINDS)}, not "
                             f"{kind!r}; trace that kind exactly")


def state_gradients(run: TraceRun, kinds: list[str]) -> dict[tuple[str, int], torch.Tensor]:
    """d metric / d state in the corrupted run, for each (kind, layer): (samples, tokens, d) in
    float32. All noise samples in one forward and one backward pass (each sample's metric depends on
    its own row only, so the gradient of their sum is each one's gradient)."""
    lm = run.lm
    hooks = {(kind, layer): Hook(lm.arch.module(kind, layer), keep_output=True, detach=False)
             for kind in kinds for layer in range(lm.n_layers)}
    ids = run.tokenized.input_ids.expand(run.samples, -1)
    # The embedding output becomes a leaf that needs a gradient, so that a graph is built even when
    # the weights do not need one; the corruption is applied after it (hooks run in order).
    start_graph = Hook(lm.arch.embed, edit_output=lambda embedded: embedded.detach().requires_grad_(True))
    with torch.enable_grad():
        with start_graph, Hooks(hooks), run.corruption_hook():
            logits, _ = last_token_logits(lm, ids)
        keys = list(hooks)
        grads = torch.autograd.grad(run.metric_of(logits).sum(), [hooks[key].output for key in keys],
                                    allow_unused=True)
    result = {}
    for key, grad in zip(keys, grads):
        state = hooks[key].output
        grad = torch.zeros_like(state) if grad is None else grad
        result[key] = as_batch_seq(grad.detach(), run.samples).float()
    return result


def layer_terms(run: TraceRun, gradients: dict[tuple[str, int], torch.Tensor], kind: str) -> torch.Tensor:
    """(tokens, layers): the first-order change of the metric from restoring `kind` at one (token,
    layer), averaged over the noise samples. Zero before the subject, where nothing was corrupted."""
    columns = []
    for layer in range(run.lm.n_layers):
        grad = gradients[(kind, layer)]
        change = run.clean[(kind, layer)].to(grad.device).float()[None] - run.corrupt[(kind, layer)].float().to(grad.device)
        columns.append((change * grad).sum(-1).mean(0).cpu())
    terms = torch.stack(columns, dim=1)
    terms[: run.tokenized.subject_range[0]] = 0.0
    return terms


def estimated_heatmaps(run: TraceRun, kinds: list[str], *, window: int = 10, approx: str = "atp"
                       ) -> dict[str, TraceResult]:
    """{kind: TraceResult} of estimated scores (p_corrupt + the first-order change), marked
    approx="atp", from one forward and backward pass for all kinds."""
    check_approx(approx, kinds)
    if window < 1:
        raise InputError(f"window must be at least 1, not {window}")
    gradients = state_gradients(run, kinds)
    n_layers = run.lm.n_layers
    results = {}
    for kind in kinds:
        terms = layer_terms(run, gradients, kind)
        if kind in ("mlp", "attn"):
            terms = torch.stack([terms[:, list(window_layers(layer, window, n_layers))].sum(1)
                                 for layer in range(n_layers)], dim=1)
        results[kind] = result_of(run, kind, window, (run.p_corrupt + terms.double()).numpy(), approx=approx)
    return results


def refine(run: TraceRun, estimate: TraceResult, k: int, *, max_batch_tokens: int = 2048) -> list[dict]:
    """The `k` cells the estimate ranks highest, computed exactly. Each row: token, layer, the
    estimate, the exact value, both ranks among the k, and `disagree`: the two differ by more than
    DISAGREE_SHARE of the total effect. Also stored in estimate.extra["refined"]."""
    if k < 1:
        raise InputError(f"--refine needs at least 1 cell, not {k}")
    n_layers = run.lm.n_layers
    cells = heatmap_cells(estimate.kind, run.n_tokens, n_layers, estimate.window)
    flat = estimate.scores.ravel()
    order = np.argsort(-flat, kind="stable")[:k]
    exact = restored_probs(run, [cells[i] for i in order], max_batch_tokens=max_batch_tokens).numpy().astype(float)
    exact_rank = np.empty(len(order), dtype=int)
    exact_rank[np.argsort(-exact, kind="stable")] = np.arange(1, len(order) + 1)
    tolerance = DISAGREE_SHARE * abs(run.p_clean - run.p_corrupt)
    rows = []
    for rank, (index, value) in enumerate(zip(order, exact)):
        token, layer = divmod(int(index), n_layers)
        rows.append({"token": token, "layer": layer, "estimate": float(flat[index]), "exact": float(value),
                     "rank_estimate": rank + 1, "rank_exact": int(exact_rank[rank]),
                     "disagree": bool(abs(flat[index] - value) > tolerance)})
    estimate.extra["refined"] = rows
    return rows


def refine_summary(estimate: TraceResult, rows: list[dict]) -> str:
    """What the exact confirmation of the top cells says about the estimate, in a few lines."""
    tokens, p0 = estimate.tokens, estimate.p_corrupt
    best = max(rows, key=lambda r: r["exact"])
    top = rows[0]
    worst = max(abs(r["estimate"] - r["exact"]) for r in rows)
    lines = [f"{'':>16}refined {len(rows)} cells exactly: peak at token {best['token']} {tokens[best['token']]!r}, "
             f"layer {best['layer']}: {best['exact'] - p0:+.3f}; the estimate's top cell "
             f"{'is' if best is top else 'is not'} the exact peak; max |estimate - exact| {worst:.3f}"]
    off = [r for r in rows if r["disagree"]]
    if off:
        listed = ", ".join(f"({r['token']}, {r['layer']}): {r['estimate'] - p0:+.3f} vs {r['exact'] - p0:+.3f}"
                           for r in off[:5])
        lines.append(f"{'':>16}{len(off)} disagree (by more than {DISAGREE_SHARE:.0%} of the total effect): {listed}"
                     + (" ..." if len(off) > 5 else ""))
    return "\n".join(lines)
