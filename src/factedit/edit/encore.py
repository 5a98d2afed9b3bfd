"""ENCORE (Gupta et al. 2025, "Lifelong Sequential Knowledge Editing without Model Degradation", arXiv
2502.01636): MEMIT's solve that also keeps the earlier edits and bounds the update's size.

MEMIT's targets (targets.py) and its spreading over layers (mass_edit.spread_over_layers), with this
solve per layer: K the batch's keys, R their residuals, C the statistics' key second moment, H = the
sum of K_p K_p^T over the keys of the earlier batches (the editing history, as for AlphaEdit) and I
the identity,

    Delta W = R K^T (lambda C + mu I + H + K K^T)^-1.

lambda C keeps the outputs of ordinary text's keys (MEMIT's term), H those of the earlier edits
(MEMIT forgets them: its next batch may overwrite them), and mu I charges the update's size: the
authors trace the collapse after many sequential edits to the edited matrices' norms growing batch
after batch, and the ridge stops that growth. Their targets stop as soon as the new object is the
most likely token on every prompt for two steps ("most-probable early stopping", MPES:
ValueSettings.early_stop_on = "top"), which also keeps the targets from overshooting.

Each batch carries its keys (EditDelta.keys), so H belongs to the history (history.py), as AlphaEdit's.
The reference gives mu as an absolute number (10 for GPT-2 XL, 20 for Llama3-8B), which depends on the
scale of a model's keys; here it is relative to the mean energy of a statistics key (norm_rule), and
lambda follows MEMIT's rule (mass_edit.scaled_mom2_weight); "paper" keeps the reference's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import LoadedModel
from ..progress import Phases
from ..request import EditRequest
from ..settings import bounded, one_of
from ..stats import key_statistics_at
from .delta import EditDelta
from .mass_edit import MassEditSettings, earlier_edits, scaled_mom2_weight, spread_over_layers
from .value import EARLY_STOP_CRITERIA, optimisation_lines

NORM_RULES = ("key_energy", "absolute")


@dataclass(kw_only=True)
class EncoreSettings(MassEditSettings):
    mom2_update_weight: float = bounded(15000.0, above=0)  # lambda, as MEMIT's (see defaults_for)
    # "key_energy": mu = norm_lambda x the mean energy of a statistics key (trace of C), so that the
    # charge on the update's size means the same on every model; "absolute": mu = norm_lambda.
    norm_rule: str = one_of("key_energy", NORM_RULES)
    norm_lambda: float = bounded(0.5, at_least=0)
    preserve_weight: float = bounded(1.0, at_least=0)  # weight of H; the reference's is 1
    # MPES: stop a target's optimisation once the new object leads on every prompt for two steps.
    early_stop_on: str = one_of("top", EARLY_STOP_CRITERIA)
    early_stop_steps: int = bounded(2, at_least=1)

    @classmethod
    def defaults_for(cls, lm: LoadedModel, layer: int | None = None, **overrides) -> "EncoreSettings":
        """The default layers (MassEditSettings.default_layers) and MEMIT's lambda rule."""
        layers, rule = cls.default_layers(lm, layer)
        overrides.setdefault("mom2_update_weight", scaled_mom2_weight(lm))
        return cls(**{"layers": layers, "layer_rule": rule if "layers" not in overrides else "given", **overrides})


# Named settings beside the per-model defaults (preset name -> field values; the registry's presets).
# "paper": the reference's for Llama3-8B (hparams/ENCORE/llama3-8b.json): 25 value steps, MPES after
# two steps with the target on top, lambda 15,000, mu 20 (GPT-2 XL: 20 steps, 4, 20,000 and 10).
PRESETS = {"paper": {"v_lr": 0.5, "v_steps": 25, "v_weight_decay": 0.5, "clamp_norm_factor": 0.75, "kl_factor": 0.0625,
                     "early_stop_on": "top", "early_stop_steps": 2, "prefix_lengths": [[10, 5]],
                     "prefix_context": "", "mom2_update_weight": 15000.0, "norm_rule": "absolute",
                     "norm_lambda": 20.0}}


def encore_solve(K: torch.Tensor, C: torch.Tensor, H: torch.Tensor, mom2_weight: float, mu: float) -> torch.Tensor:
    """`down` (n, d_mlp) of the update Delta W = R down: K^T (lambda C + mu I + H + K K^T)^-1, for K
    (d_mlp, n) and C, H (d_mlp, d_mlp); in float64."""
    K, C, H = K.double(), C.to(K.device, torch.float64), H.to(K.device, torch.float64)
    A = mom2_weight * C + H + K @ K.T
    A.diagonal().add_(mu)
    return torch.linalg.solve(A, K).T


def encore_delta(lm: LoadedModel, requests: list[EditRequest], settings: EncoreSettings, *, cache_dir=None,
                 progress: Phases | None = None, history=None) -> tuple[EditDelta, list[dict]]:
    """The ENCORE update for `requests` on the model as it is, keeping the keys of the batches in
    `history` (an EditHistory; None: nothing edited before). The model is not modified."""
    layers = sorted(settings.layers)
    earlier = earlier_edits(lm, history, layers, settings.preserve_weight)
    C = {layer: stats.matrix for layer, (stats, _, _) in key_statistics_at(lm, settings, cache_dir, progress).items()}
    mu = {layer: settings.norm_lambda * (float(C[layer].trace()) if settings.norm_rule == "key_energy" else 1.0)
          for layer in layers}

    def solve(layer: int, K: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return encore_solve(K, C[layer], earlier.H[layer], settings.mom2_update_weight, mu[layer])

    delta, diagnostics = spread_over_layers(lm, requests, settings, solve, "encore", cache_dir=cache_dir,
                                            progress=progress, record_keys=True)
    delta.info.update({"unpreserved_batches": earlier.unpreserved_batches, "norm_ridge": mu,
                       "preserved_keys": earlier.preserved_keys})
    return delta, diagnostics


def report_lines(delta: EditDelta, diagnostics: list[dict], settings: EncoreSettings) -> list[str]:
    """What to tell a person about an ENCORE edit beyond its effect: the earlier edits it kept, the
    norm ridge, how the target optimisations ended."""
    info, lines = delta.info, []
    if "norm_ridge" in info:
        lines.append(f"kept the keys of {info['preserved_keys']} earlier edit(s); norm ridge mu per layer: "
                     + ", ".join(f"{layer}: {mu:.3g}" for layer, mu in info["norm_ridge"].items()))
    if info.get("unpreserved_batches"):
        lines.append(f"note: {info['unpreserved_batches']} earlier batch(es) of other methods changed these layers "
                     "without recording keys; ENCORE could not keep what they wrote")
    return lines + optimisation_lines(diagnostics, settings)
