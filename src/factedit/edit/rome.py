"""ROME (Meng et al. 2022, section 3): a rank-one update of one MLP output matrix.

The method in its natural steps, each usable alone (`rome_delta` runs them for one request,
`rome_edit` for several, one after another):

1. `context_templates` (prefixes.py, shared with MEMIT and AlphaEdit): "{}" plus short texts
   sampled from the model, as prefixes ("<text>. {}").
2. `compute_keys`: the MLP key (input of the output projection) and value (its output) at the
   subject's last token, for every prefixed prompt; their averages.
3. `compute_value_delta` (value.py): optimise a vector added to the MLP output at the subject's last
   token so that the model predicts the new target, keeping "{subject} is a" close to the original
   (KL); with `update_shares`, each prompt receives the share of the change the update will give it.
4. `solve_rank_one`: W' = W + (v* - W k)(C^-1 k)^T / ((C^-1 k)^T k) against the key statistics C
   (`key_statistics` in factedit.stats; the direction C^-1 k / ((C^-1 k)^T k) is `update_left`).

The layer (when none is given) comes from the shared rule in layers.py.

Two variants share all of it (see `RomeSettings.key_mode`):
* "consistent" (method `rome`, default): the averaged key k and averaged value W k are used in every
  step, which later work showed avoids the "disabling" edits that make the model collapse.
* "original" (method `rome-original`): the reference implementation's mix: direction C^-1 k_avg
  but residual and denominator from the plain prompt's key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..models import LoadedModel
from ..progress import OPTIMISATION, Phases, start_phase
from ..request import EditRequest
from ..settings import bounded, one_of
from ..stats import StatisticsSettings, key_statistics
from .delta import EditDelta, EditStack
from .layers import edit_layer
from .mlp_change import response_clamp
from .prefixes import context_templates
from .prompts import io_at_subject
from .value import ValueSettings, compute_value_delta, optimisation_lines


KEY_MODES = ("consistent", "original")


@dataclass(kw_only=True)
class RomeSettings(ValueSettings, StatisticsSettings):
    """ROME's settings: the value optimisation's (ValueSettings; the norm clamp derived per model, see
    defaults_for), the statistics' (StatisticsSettings), and the solve's."""

    layer: int = bounded(at_least=0)  # (its upper bound depends on the model: Method.check_settings)
    key_mode: str = one_of("consistent", KEY_MODES)  # "consistent" (rome) or "original" (rome-original)
    ridge: float = bounded(1e-4, at_least=0)  # added to C's diagonal, relative to its mean diagonal (conditioning)
    # True: the value step adds to each prompt the share of the change that the rank-one update will
    # give it (update_shares), so it optimises what the edit will do; False: the same change at every
    # prompt, as the reference (whose update then reaches prompts whose keys differ only in part).
    value_through_update: bool = True
    layer_rule: str = ""  # how the layer was chosen, for the record
    clamp_rule: str = ""  # how clamp_norm_factor was chosen, for the record
    preset: str = "default"  # the named settings these came from ("paper": the reference's protocol)

    @classmethod
    def defaults_for(cls, lm: LoadedModel, layer: int | None = None, **overrides) -> "RomeSettings":
        """Per-model defaults derived from the model's structure: the layer (edit_layer) and the norm
        clamp (clamp_for_block)."""
        layer, rule = edit_layer(lm, layer)
        if "clamp_norm_factor" not in overrides:
            overrides["clamp_norm_factor"] = clamp_for_block(lm, layer)
            overrides.setdefault("clamp_rule", CLAMP_RULE)
        else:
            overrides.setdefault("clamp_rule", "given")
        return cls(layer=layer, layer_rule=rule, **overrides)


CLAMP_RULE = "largest factor <= 4 at which the block passes on 0.9 of the change (mlp_change.response_clamp)"


def clamp_for_block(lm: LoadedModel, layer: int) -> float:
    """The reference's clamp (4 x ||v||) where the block passes a change of the MLP output on as it is;
    where a norm follows the MLP (Gemma), the largest factor at which the block still passes on 0.9 of
    a change's linearised effect. Beyond it the edit saturates at its subject while the neighbours,
    which receive a small share of the change, do not, so the share of the edit that reaches them
    grows by 1 / response (here at most 1.11x). On Gemma 3 at layer 3, CounterFact neighbourhood
    success with the reference's 4: 40, with 1.12 (response 0.75): 56, with this rule's 0.62: 62
    (unedited 69.5; docs/results.md#rome-clamp-rule)."""
    return response_clamp(lm, layer, ceiling=4.0, keep=0.9)


# Named settings beside the per-model defaults (preset name -> field values; the registry's presets,
# for rome and rome-original). "paper": the reference implementation's for GPT-2 XL (hparams/ROME/gpt2-xl.json).
PRESETS = {"paper": {"v_lr": 0.5, "v_steps": 20, "v_weight_decay": 0.5, "clamp_norm_factor": 4.0, "kl_factor": 0.0625,
                     "early_stop_loss": 0.05, "early_stop_on": "total", "prefix_lengths": [[5, 10], [10, 10]],
                     "prefix_context": "", "value_through_update": False,
                     "clamp_rule": "the reference's 4"}}


# ------------------------------------------------------------------------------------- 2. the keys

@dataclass
class Keys:
    k_avg: torch.Tensor  # (d_mlp,) mean key over the templates
    v_avg: torch.Tensor  # (d,) mean MLP output there
    k_plain: torch.Tensor  # key of the plain prompt (template "{}")
    v_plain: torch.Tensor
    k_each: torch.Tensor  # (n_templates, d_mlp) the key under each template


def compute_keys(lm: LoadedModel, layer: int, request: EditRequest, templates: list[str]) -> Keys:
    k, v = io_at_subject(lm, "mlp", layer, request, templates)
    return Keys(k.mean(0), v.mean(0), k[0], v[0], k)


# ------------------------------------------------------------------------------------ 4. the solve

def update_left(C: torch.Tensor, k_direction: torch.Tensor, k_residual: torch.Tensor, ridge: float = 0.0
                ) -> torch.Tensor:
    """left = C^-1 k_direction / ((C^-1 k_direction)^T k_residual), in float64: Delta W = right left^T
    changes the output at any key k by right x (left^T k), by exactly `right` at k_residual.
    `ridge` x mean(diag C) is added to C."""
    C = C.double()
    if ridge:
        C = C + ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    u = torch.linalg.solve(C, k_direction.double().to(C.device))
    denominator = u @ k_residual.double().to(C.device)
    if denominator.abs() < 1e-12:
        raise ValueError("degenerate ROME update: (C^-1 k)^T k is zero")
    return u / denominator


def solve_rank_one(C: torch.Tensor, k_direction: torch.Tensor, k_residual: torch.Tensor, v_current: torch.Tensor,
                   v_target: torch.Tensor, ridge: float = 0.0, *, left: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (left, right) of Delta W = right left^T with Delta W k_residual = v_target - v_current
    and the update direction C^-1 k_direction (see update_left). `left`: update_left's result for
    these arguments where it is already solved (rome_delta needs it before the value step), so that
    it is not solved again."""
    if left is None:
        left = update_left(C, k_direction, k_residual, ridge)
    right = (v_target - v_current).double()
    return left.float(), right.float().to(left.device)


# -------------------------------------------------------------------------------------- the editor

def update_shares(lm: LoadedModel, request: EditRequest, settings: RomeSettings, keys: Keys,
                  left: torch.Tensor) -> torch.Tensor:
    """The share of the edit's change each prompt of the value step will receive from the rank-one
    update with direction `left` (update_left): left^T k at its key, one per template, then the
    essence prompt. Not 1 everywhere: on SmolLM2 a subject at the very start of the text (position 0,
    which the model uses as an attention sink) can have a key that receives as little as 7% of an
    update made for the key averaged over contexts (docs/results.md#value-through-update)."""
    essence = EditRequest.create(settings.essence_prompt, request.subject, request.target_new)
    k_essence = io_at_subject(lm, "mlp", settings.layer, essence, ["{}"])[0]
    return (torch.cat([keys.k_each, k_essence]).double().to(left.device) @ left).float()


def rome_delta(lm: LoadedModel, request: EditRequest, settings: RomeSettings, C: torch.Tensor,
               templates: list[str], *, progress: Callable[[int], None] | None = None,
               forward: str = "cached") -> tuple[EditDelta, dict]:
    """The rank-one edit for one request (the model is not modified)."""
    layer = settings.layer
    keys = compute_keys(lm, layer, request, templates)
    # The value the update is written for, and its key: averaged (consistent) or the plain prompt's.
    v_current = keys.v_avg if settings.key_mode == "consistent" else keys.v_plain
    k_residual = keys.k_avg if settings.key_mode == "consistent" else keys.k_plain
    left = update_left(C, keys.k_avg, k_residual, settings.ridge)  # solved once: the shares need it too
    shares = update_shares(lm, request, settings, keys, left) if settings.value_through_update else None
    value = compute_value_delta(lm, layer, request, templates, settings, v_current, forward=forward,
                                row_scales=shares, progress=progress)
    left, right = solve_rank_one(C, keys.k_avg, k_residual, v_current, value.target_init + value.delta,
                                 settings.ridge, left=left)
    name = lm.arch.mlp_out_path(layer)
    method = "rome" if settings.key_mode == "consistent" else "rome-original"
    delta = EditDelta(method, lm.fingerprint, {name: {"up": right.unsqueeze(1).cpu(), "down": left.unsqueeze(0).cpu()}},
                      settings.to_dict(), [request.to_dict()])
    return delta, {**value.diagnostics(), "value_norm": float(value.target_init.norm())}


def rome_edit(lm: LoadedModel, requests: list[EditRequest], settings: RomeSettings, *, cache_dir: Path | None = None,
              progress: Phases | None = None, history=None) -> tuple[EditDelta, list[dict]]:
    """ROME for `requests` (methods rome and rome-original): the key statistics and the prefixes once,
    then rome_delta per request, each computed on the model with the previous ones applied; the
    deltas composed. The model is left as it was. `progress`: the phases (factedit.progress), the
    value optimisation once per request, counted in steps. (`history` is not read.)"""
    stats, path, _ = key_statistics(lm, settings, cache_dir=cache_dir, progress=progress)
    C = stats.matrix.to(lm.device)
    templates = context_templates(lm, settings, cache_dir, progress=progress)
    stack, total, diagnostics = EditStack(lm), None, []
    try:  # several requests: each is computed on the model with the previous ones applied
        for request in requests:
            steps = start_phase(progress, OPTIMISATION, settings.v_steps, "step")  # at most v_steps: it may converge first
            delta, info = rome_delta(lm, request, settings, C, templates, progress=steps)
            diagnostics.append(info)
            if len(requests) > 1:
                stack.apply(delta)
            total = delta if total is None else total.compose(delta)
    finally:
        stack.revert_all()
    total.info.update({"diagnostics": diagnostics, "stats_keys": stats.count, "stats_file": path.name})
    return total, diagnostics


def report_lines(delta: EditDelta, diagnostics: list[dict], settings: RomeSettings) -> list[str]:
    """What to tell a person about a ROME edit beyond its effect: the key statistics it used and how
    the value optimisation ended."""
    lines = []
    if "stats_file" in delta.info:
        lines.append(f"key statistics: {delta.info['stats_keys']} keys ({delta.info['stats_file']}; 'model-sampled' "
                     "in the name means text sampled from the model, as no corpus was given)")
    return lines + optimisation_lines(diagnostics, settings)
