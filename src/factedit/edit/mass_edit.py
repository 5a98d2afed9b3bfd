"""What the editors that write many edits at once over a range of MLP layers share (MEMIT, Meng et
al. 2023, and AlphaEdit, which differs only in the per-layer solve):

1. For each request, a target hidden state z at the last layer L of the range (targets.py).
2. For each layer l of the range, lowest first, on the model updated so far:
   K = keys at l (averaged over the context templates), R = (z - current block-L output) / (layers
   left), and Delta W_l = R down, with `down` from the method's solve (MEMIT's: K^T (lambda C_l +
   K K^T)^-1, a least-squares update that keeps the existing keys' outputs while mapping the new
   keys to their residuals). R is a change of the block's output; where a norm follows the MLP
   (Gemma) it is first turned into the change of the MLP projection's output that produces it
   (mlp_change.py).
As in the reference code, the residual uses the plain prompt's hidden state while the keys are
averaged over templates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import InputError
from ..models import LoadedModel
from ..progress import OPTIMISATION, Phases, start_phase
from ..request import EditRequest
from ..settings import bounded
from ..stats import StatisticsSettings
from .delta import EditDelta, EditStack
from .layers import edit_layer
from .mlp_change import mlp_change
from .prefixes import context_templates
from .prompts import io_at_subject
from .targets import TargetCache, compute_targets
from .value import ValueSettings


@dataclass(kw_only=True)
class MassEditSettings(ValueSettings, StatisticsSettings):
    """What every editor that spreads many edits over a range of layers shares (MEMIT, AlphaEdit):
    the targets' value optimisation (ValueSettings, with MEMIT's clamp and prefixes), the statistics
    (StatisticsSettings) and the layers."""

    layers: list[int] = bounded(at_least=0)  # (their upper bound depends on the model: Method.check_settings)
    # Redeclared fields replace the base's, range included: each states its range again.
    clamp_norm_factor: float = bounded(0.75, above=0)
    prefix_lengths: list[list[int]] = bounded(default_factory=lambda: [[10, 5]], at_least=1,
                                              item_length=2)  # [tokens, count]
    batch_requests: int = bounded(16, at_least=1)  # requests whose targets are optimised together (same result, faster)
    layer_rule: str = ""
    preset: str = "default"

    @staticmethod
    def default_layers(lm: LoadedModel, layer: int | None = None) -> tuple[list[int], str]:
        """Five layers ending one above ROME's default layer (or ending at `layer`), and the rule."""
        top = layer if layer is not None else min(lm.n_layers - 1, edit_layer(lm)[0] + 1)
        if not 0 <= top < lm.n_layers:
            raise InputError(f"layer {top} out of range: the model has {lm.n_layers} layers")
        rule = "given top layer" if layer is not None else "5 layers ending one above ROME's default layer"
        return list(range(max(0, top - 4), top + 1)), rule


GPTJ_D_MLP = 16384  # the MLP width of GPT-J, where MEMIT's lambda = 15,000 was tuned


def scaled_mom2_weight(lm: LoadedModel) -> float:
    """MEMIT's lambda (the weight of the statistics C in the solve) scaled from GPT-J's 15,000 by the
    MLP width: a typical key has k^T C^-1 k close to d_mlp, so the share of the residual one layer's
    update achieves, about s / (1 + s) with s = k^T C^-1 k / lambda, stays what MEMIT tuned only when
    lambda grows with d_mlp. (On SmolLM2, d_mlp 1,536, the unscaled 15,000 leaves a tenth of the fact
    written per layer: efficacy 0.8 against 1.0 on the first 10 CounterFact records.)"""
    return round(15000.0 * lm.arch.d_mlp / GPTJ_D_MLP, 1)


def _as_mlp_change(lm: LoadedModel, layer: int, requests: list[EditRequest], wanted: torch.Tensor, template: str,
                   diagnostics: list[dict], chunk: int = 64) -> torch.Tensor:
    """`wanted` (d, n) as changes of the MLP projection's output (see mlp_change); the share each
    request reaches goes to its diagnostics."""
    columns = []
    for start in range(0, len(requests), chunk):
        found = mlp_change(lm, layer, requests[start:start + chunk], wanted[:, start:start + chunk].T, template)
        columns.append(found.change.T.double())
        for d, reached in zip(diagnostics[start:start + chunk], found.reached.tolist()):
            d.setdefault("mlp_reached", {})[layer] = round(reached, 4)
    return torch.cat(columns, 1)


def change_norms(change: torch.Tensor, outputs: torch.Tensor) -> dict[str, float]:
    """What a layer was asked to change, beside what its MLP outputs now, over a batch's requests
    (columns): the mean ||x|| of the asked change of the MLP projection's output, the mean ||m|| of
    that output, and the median of ||x|| / ||m||. Logged per layer and batch: behind a norm (Gemma),
    an x that grows with m batch after batch is the feedback loop that ruins a lifelong run."""
    asked, current = change.norm(dim=0), outputs.norm(dim=0)
    return {"asked": round(float(asked.mean()), 4), "mlp_output": round(float(current.mean()), 4),
            "asked_share": round(float((asked / current.clamp_min(1e-12)).median()), 4)}


@dataclass(frozen=True)
class EarlierEdits:
    """What the batches before this one left at the edited layers, for the editors that keep earlier
    edits (AlphaEdit, ENCORE): H per layer, and how many keys and unkeyed batches there are."""

    H: dict[int, torch.Tensor]  # weight x K_p K_p^T over the keys the earlier batches recorded there
    preserved_keys: int
    unpreserved_batches: int  # batches of other methods (MEMIT, ROME, ...) that changed these layers without keys


def earlier_edits(lm: LoadedModel, history, layers: list[int], weight: float) -> EarlierEdits:
    """EarlierEdits of `history` (an EditHistory; None: nothing edited before) at `layers`; refuses a
    history that keeps keys at other layers."""
    modules = {layer: lm.arch.mlp_out_path(layer) for layer in layers}
    if history is not None and history.key_modules() and history.key_modules() != set(modules.values()):
        raise InputError(f"the editing history keeps keys at {', '.join(sorted(history.key_modules()))}, but these "
                         f"settings edit layers {layers}; continue a history with the layers it was made with")
    d_mlp = lm.arch.d_mlp
    H = {layer: weight * history.key_moment(modules[layer], d_mlp) if history is not None else
         torch.zeros(d_mlp, d_mlp, dtype=torch.float64) for layer in layers}
    kept = history.preserved_keys(modules[layers[0]]).shape[1] if history is not None and history.key_modules() else 0
    unkeyed = [batch for batch in (history.batches if history is not None else [])
               if set(batch.changes) & set(modules.values()) and not batch.keys]
    return EarlierEdits(H, kept, len(unkeyed))


# solve(layer, K, residual) -> down (n, d_mlp): the layer's update is Delta W = residual @ down.
LayerSolve = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def spread_over_layers(lm: LoadedModel, requests: list[EditRequest], settings: MassEditSettings, solve: LayerSolve,
                       method: str, *, cache_dir=None, progress: Phases | None = None, record_keys: bool = False
                       ) -> tuple[EditDelta, list[dict]]:
    """Steps 1 and 2 of the module docstring with the per-layer solve given (MEMIT's, AlphaEdit's).
    `record_keys`: the delta also carries each layer's keys, read once every layer is updated (as
    the reference's AlphaEdit does), for editors that preserve earlier edits. `progress`: the phases
    (factedit.progress): statistics and prefixes before, then the value optimisation of the
    requests' targets, counted in requests."""
    layers = sorted(settings.layers)
    top = layers[-1]
    templates = context_templates(lm, settings, cache_dir, progress=progress)
    # 1. target hidden states z at the top layer, optimised for several requests at once
    targets_done = start_phase(progress, OPTIMISATION, len(requests), "request")
    found = compute_targets(lm, requests, settings, top, templates, TargetCache(lm, settings, top, cache_dir),
                            targets_done, settings.batch_requests)
    z = torch.stack([f["z"] for f in found], 1).to(lm.device).double()  # (d, n)
    diagnostics = [{key: value for key, value in f.items() if key != "z"} for f in found]

    def keys_at(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(d_mlp, n) keys, each averaged over the templates, and (d_out, n) the MLP projection's
        outputs on the plain prompts."""
        found = [io_at_subject(lm, "mlp", layer, r, templates) for r in requests]
        return (torch.stack([keys.mean(0) for keys, _ in found], 1).double(),
                torch.stack([outputs[0] for _, outputs in found], 1).double())

    # 2. spread the change over the layers, lowest first, each on the model updated so far
    stack, total, norms = EditStack(lm), None, {}
    try:
        for i, layer in enumerate(layers):
            K, outputs = keys_at(layer)
            current = torch.stack([io_at_subject(lm, "hidden", top, r, templates[:1])[1][0] for r in requests], 1)
            wanted = (z - current.double()) / (len(layers) - i)  # this layer's share of the block-output change
            residual = _as_mlp_change(lm, layer, requests, wanted, templates[0], diagnostics)
            norms[layer] = change_norms(residual, outputs)
            down = solve(layer, K, residual)
            delta = EditDelta(method, lm.fingerprint, {lm.arch.mlp_out_path(layer): {"up": residual.float().cpu(),
                                                                       "down": down.float().cpu()}},
                              settings.to_dict(), [r.to_dict() for r in requests])
            stack.apply(delta)
            total = delta if total is None else total.compose(delta)
        if record_keys:
            total.keys = {lm.arch.mlp_out_path(layer): keys_at(layer)[0].float().cpu() for layer in layers}
    finally:
        stack.revert_all()
    total.info["layer_norms"] = norms
    total.method = method
    total.requests = [r.to_dict() for r in requests]
    return total, diagnostics
