"""MEMIT (Meng et al. 2023): many edits at once, spread over a range of MLP layers.

1. For each request, a target hidden state z at the last layer L of the range: the block output at
   the subject's last token plus an optimised delta (ROME's value step, applied to the block).
2. For each layer l of the range, lowest first, on the model updated so far:
   K = keys at l (averaged over the context templates), R = (z - current block-L output) / (layers
   left), and Delta W_l = R K^T (lambda C_l + K K^T)^-1, a least-squares update that keeps the
   existing keys' outputs (weighted by lambda) while mapping the new keys to their residuals.
   R is a change of the block's output; where a norm follows the MLP (Gemma) it is first turned into
   the change of the MLP projection's output that produces it (mlp_change.py).
As in the reference code, the residual uses the plain prompt's hidden state while the keys are
averaged over templates.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..cache_files import read_cached, write_atomic
from ..errors import InputError
from ..models import LoadedModel, cache_root, weights_fingerprint
from ..progress import OPTIMISATION, Phases, start_phase
from ..stats import StatisticsSettings, second_moments
from .delta import EditDelta, EditStack
from .mlp_change import mlp_change
from ..request import EditRequest
from .prompts import io_at_subject
from .rome import context_templates, edit_layer, statistics_corpus
from .value import ValueSettings, compute_value_deltas
from ..settings import bounded


GPTJ_D_MLP = 16384  # the MLP width of GPT-J, where MEMIT's lambda = 15,000 was tuned


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


@dataclass(kw_only=True)
class MemitSettings(MassEditSettings):
    mom2_update_weight: float = bounded(15000.0, above=0)  # lambda: weight of the existing keys' statistics (see defaults_for)

    @classmethod
    def defaults_for(cls, lm: LoadedModel, layer: int | None = None, **overrides) -> "MemitSettings":
        """The default layers (MassEditSettings.default_layers), and lambda scaled from GPT-J's 15,000
        by the MLP width: a typical key has k^T C^-1 k close to d_mlp, so the share of the residual one
        layer's update achieves, about s / (1 + s) with s = k^T C^-1 k / lambda, stays what MEMIT
        tuned only when lambda grows with d_mlp. (On SmolLM2, d_mlp 1,536, the unscaled 15,000 leaves
        a tenth of the fact written per layer: efficacy 0.8 against 1.0 on the first 10 CounterFact
        records.)"""
        layers, rule = cls.default_layers(lm, layer)
        overrides.setdefault("mom2_update_weight", round(15000.0 * lm.arch.d_mlp / GPTJ_D_MLP, 1))
        return cls(**{"layers": layers, "layer_rule": rule if "layers" not in overrides else "given", **overrides})


# The reference implementation's settings for GPT-J (hparams/MEMIT/EleutherAI_gpt-j-6B.json), by name;
# its lambda is not scaled with the MLP width.
PAPER_SETTINGS = {"v_lr": 0.5, "v_steps": 25, "v_weight_decay": 0.5, "clamp_norm_factor": 0.75, "kl_factor": 0.0625,
                  "early_stop_loss": 0.05, "early_stop_on": "total", "prefix_lengths": [[10, 5]], "prefix_context": "",
                  "mom2_update_weight": 15000.0}


def key_statistics_at(lm: LoadedModel, settings: MassEditSettings, cache_dir, progress: Phases | None) -> dict:
    """{layer: (SecondMoment, cache path, cache hit)} for every layer of the settings."""
    corpus = statistics_corpus(lm, settings, progress)
    return second_moments(lm, settings.layers, corpus, settings.stats_tokens, cache_dir=cache_dir, progress=progress)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


class TargetCache:
    """Each request's target z on disk, so that a long batch (1,000 edits: hours on a CPU) resumes
    where it stopped. Keyed by the current weights (an earlier edit changes them), the device, the
    top layer and the value-step settings; one file per request."""

    def __init__(self, lm: LoadedModel, settings: MemitSettings, top: int, cache_dir: Path | None):
        key = {"weights": weights_fingerprint(lm.model), "device": str(lm.device), "layer": top,
               "settings": settings.value_settings()}
        self.folder = cache_root(cache_dir) / "memit_targets" / _digest(key)

    def _path(self, request: EditRequest) -> Path:
        return self.folder / f"{_digest(request.to_dict())}.pt"

    def get(self, request: EditRequest) -> dict | None:
        return read_cached(self._path(request), lambda path: torch.load(path, weights_only=True))

    def put(self, request: EditRequest, found: dict) -> None:
        write_atomic(self._path(request), lambda partial: torch.save(found, partial))


def _targets(lm: LoadedModel, requests: list[EditRequest], settings: MemitSettings, top: int, templates: list[str],
             cache: TargetCache, progress) -> list[dict]:
    """Step 1 for every request, optimised `batch_requests` at a time; cached targets are reused."""
    found = [cache.get(r) for r in requests]
    missing = [i for i, f in enumerate(found) if f is None]
    if progress and len(missing) < len(requests):
        progress(len(requests) - len(missing))
    for start in range(0, len(missing), settings.batch_requests):
        chunk = missing[start:start + settings.batch_requests]
        chunk_requests = [requests[i] for i in chunk]
        hidden = torch.stack([io_at_subject(lm, "hidden", top, r, templates[:1])[1][0] for r in chunk_requests])
        values = compute_value_deltas(lm, top, chunk_requests, templates, settings, hidden, kind="hidden")
        for i, h, value in zip(chunk, hidden, values):
            found[i] = {"z": (h + value.delta.to(h.device)).cpu(), **value.diagnostics()}
            cache.put(requests[i], found[i])
        if progress:
            progress(len(chunk))
    return found


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
    found = _targets(lm, requests, settings, top, templates, TargetCache(lm, settings, top, cache_dir), targets_done)
    z = torch.stack([f["z"] for f in found], 1).to(lm.device).double()  # (d, n)
    diagnostics = [{key: value for key, value in f.items() if key != "z"} for f in found]

    def keys_at(layer: int) -> torch.Tensor:  # (d_mlp, n), each averaged over the templates
        return torch.stack([io_at_subject(lm, "mlp", layer, r, templates)[0].mean(0) for r in requests], 1).double()

    # 2. spread the change over the layers, lowest first, each on the model updated so far
    stack, total = EditStack(lm), None
    try:
        for i, layer in enumerate(layers):
            K = keys_at(layer)
            current = torch.stack([io_at_subject(lm, "hidden", top, r, templates[:1])[1][0] for r in requests], 1)
            wanted = (z - current.double()) / (len(layers) - i)  # this layer's share of the block-output change
            residual = _as_mlp_change(lm, layer, requests, wanted, templates[0], diagnostics)
            down = solve(layer, K, residual)
            delta = EditDelta(method, lm.fingerprint, {lm.arch.mlp_out_path(layer): {"up": residual.float().cpu(),
                                                                       "down": down.float().cpu()}},
                              settings.to_dict(), [r.to_dict() for r in requests])
            stack.apply(delta)
            total = delta if total is None else total.compose(delta)
        if record_keys:
            total.keys = {lm.arch.mlp_out_path(layer): keys_at(layer).float().cpu() for layer in layers}
    finally:
        stack.revert_all()
    total.method = method
    total.requests = [r.to_dict() for r in requests]
    return total, diagnostics


def memit_delta(lm: LoadedModel, requests: list[EditRequest], settings: MemitSettings, *, cache_dir=None,
                progress: Phases | None = None, history=None) -> tuple[EditDelta, list[dict]]:
    """MEMIT's solve at each layer: Delta W = R K^T (lambda C + K K^T)^-1. (Earlier edits in
    `history` are not read: MEMIT preserves only what the statistics C hold.)"""
    C = {layer: stats.matrix for layer, (stats, _, _) in key_statistics_at(lm, settings, cache_dir, progress).items()}

    def solve(layer: int, K: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        A = settings.mom2_update_weight * C[layer].to(K.device, torch.float64) + K @ K.T
        return torch.linalg.solve(A, K).T

    return spread_over_layers(lm, requests, settings, solve, "memit", cache_dir=cache_dir, progress=progress)
