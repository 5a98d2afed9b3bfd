"""MEMIT (Meng et al. 2023): many edits at once, spread over a range of MLP layers.

The steps it shares with AlphaEdit live in neutral modules: the context prefixes (prefixes.py), each
request's target hidden state z at the top layer of the range (targets.py, the reference's
compute_z), the key statistics C_l (factedit.stats) and the spreading of z - h over the layers,
lowest first, each on the model updated so far (mass_edit.py). What is MEMIT's own is the solve at
each layer l: with K the requests' keys at l (averaged over the templates) and R their residuals,

    Delta W_l = R K^T (lambda C_l + K K^T)^-1,

a least-squares update that keeps the existing keys' outputs (weighted by lambda) while mapping the
new keys to their residuals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import LoadedModel
from ..progress import Phases
from ..request import EditRequest
from ..settings import bounded
from ..stats import key_statistics_at
from .delta import EditDelta
from .mass_edit import MassEditSettings, scaled_mom2_weight, spread_over_layers
from .value import optimisation_lines


@dataclass(kw_only=True)
class MemitSettings(MassEditSettings):
    mom2_update_weight: float = bounded(15000.0, above=0)  # lambda: weight of the existing keys' statistics (see defaults_for)

    @classmethod
    def defaults_for(cls, lm: LoadedModel, layer: int | None = None, **overrides) -> "MemitSettings":
        """The default layers (MassEditSettings.default_layers), and lambda scaled from GPT-J's 15,000
        by the MLP width (mass_edit.scaled_mom2_weight)."""
        layers, rule = cls.default_layers(lm, layer)
        overrides.setdefault("mom2_update_weight", scaled_mom2_weight(lm))
        return cls(**{"layers": layers, "layer_rule": rule if "layers" not in overrides else "given", **overrides})


# Named settings beside the per-model defaults (preset name -> field values; the registry's presets).
# "paper": the reference implementation's for GPT-J (hparams/MEMIT/EleutherAI_gpt-j-6B.json); its
# lambda is not scaled with the MLP width.
PRESETS = {"paper": {"v_lr": 0.5, "v_steps": 25, "v_weight_decay": 0.5, "clamp_norm_factor": 0.75, "kl_factor": 0.0625,
                     "early_stop_loss": 0.05, "early_stop_on": "total", "prefix_lengths": [[10, 5]],
                     "prefix_context": "", "mom2_update_weight": 15000.0}}


def memit_delta(lm: LoadedModel, requests: list[EditRequest], settings: MemitSettings, *, cache_dir=None,
                progress: Phases | None = None, history=None) -> tuple[EditDelta, list[dict]]:
    """MEMIT's solve at each layer: Delta W = R K^T (lambda C + K K^T)^-1. (Earlier edits in
    `history` are not read: MEMIT preserves only what the statistics C hold.)"""
    C = {layer: stats.matrix for layer, (stats, _, _) in key_statistics_at(lm, settings, cache_dir, progress).items()}

    def solve(layer: int, K: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        A = settings.mom2_update_weight * C[layer].to(K.device, torch.float64) + K @ K.T
        return torch.linalg.solve(A, K).T

    return spread_over_layers(lm, requests, settings, solve, "memit", cache_dir=cache_dir, progress=progress)


def report_lines(delta: EditDelta, diagnostics: list[dict], settings: MemitSettings) -> list[str]:
    """What to tell a person about a MEMIT edit beyond its effect: how the target optimisations ended."""
    return optimisation_lines(diagnostics, settings)
