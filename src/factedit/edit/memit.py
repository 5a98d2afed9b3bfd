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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cache_files import read_cached, write_atomic
from ..errors import InputError
from ..models import LoadedModel, cache_root, weights_fingerprint
from ..progress import OPTIMISATION, Phases, start_phase
from ..settings import JsonSettings
from ..stats import second_moments
from .delta import EditDelta, EditStack
from .mlp_change import mlp_change
from ..request import EditRequest
from .prompts import io_at_subject
from .rome import context_templates, edit_layer, statistics_corpus
from .value import compute_value_deltas


GPTJ_D_MLP = 16384  # the MLP width of GPT-J, where MEMIT's lambda = 15,000 was tuned


@dataclass
class MemitSettings(JsonSettings):
    layers: list[int]
    v_lr: float = 0.5
    v_steps: int = 100  # at most; each target's optimisation stops at early_stop_loss (reference: 25)
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    early_stop_on: str = "nll"  # "nll": the target's NLL; "total": the whole objective (reference; value.py)
    essence_prompt: str = "{} is a"
    prefix_lengths: list[list[int]] = field(default_factory=lambda: [[10, 5]])  # [tokens, count]
    prefix_seed: int = 0
    prefix_context: str = "\n"  # see RomeSettings
    mom2_update_weight: float = 15000.0  # lambda: weight of the existing keys' statistics (see defaults_for)
    batch_requests: int = 16  # requests whose targets are optimised together (same result, faster)
    stats_corpus: str | None = None
    stats_tokens: int = 100_000
    layer_rule: str = ""
    preset: str = "default"

    @classmethod
    def defaults_for(cls, lm: LoadedModel, layer: int | None = None, **overrides) -> "MemitSettings":
        """Five layers ending one above ROME's default layer (or ending at `layer`), and lambda scaled
        from GPT-J's 15,000 by the MLP width: a typical key has k^T C^-1 k close to d_mlp, so the share
        of the residual one layer's update achieves, about s / (1 + s) with s = k^T C^-1 k / lambda,
        stays what MEMIT tuned only when lambda grows with d_mlp. (On SmolLM2, d_mlp 1,536, the
        unscaled 15,000 leaves a tenth of the fact written per layer: efficacy 0.8 against 1.0 on the
        first 10 CounterFact records.)"""
        top = layer if layer is not None else min(lm.n_layers - 1, edit_layer(lm)[0] + 1)
        if not 0 <= top < lm.n_layers:
            raise InputError(f"layer {top} out of range: the model has {lm.n_layers} layers")
        rule = "given top layer" if layer is not None else "5 layers ending one above ROME's default layer"
        overrides.setdefault("mom2_update_weight", round(15000.0 * lm.arch.d_mlp / GPTJ_D_MLP, 1))
        return cls(layers=list(range(max(0, top - 4), top + 1)), layer_rule=rule, **overrides)


# The reference implementation's settings for GPT-J (hparams/MEMIT/EleutherAI_gpt-j-6B.json), by name;
# its lambda is not scaled with the MLP width.
PAPER_SETTINGS = {"v_lr": 0.5, "v_steps": 25, "v_weight_decay": 0.5, "clamp_norm_factor": 0.75, "kl_factor": 0.0625,
                  "early_stop_loss": 0.05, "early_stop_on": "total", "prefix_lengths": [[10, 5]], "prefix_context": "",
                  "mom2_update_weight": 15000.0}


def _statistics(lm: LoadedModel, settings: MemitSettings, cache_dir, progress: Phases | None):
    corpus = statistics_corpus(lm, settings, progress)
    found = second_moments(lm, settings.layers, corpus, settings.stats_tokens, cache_dir=cache_dir, progress=progress)
    return {layer: stats.matrix.to(lm.device) for layer, (stats, _, _) in found.items()}


# The settings that determine a request's target z (with the weights, the device and the top layer).
TARGET_FIELDS = ("v_lr", "v_steps", "v_weight_decay", "clamp_norm_factor", "kl_factor", "early_stop_loss",
                 "early_stop_on", "essence_prompt", "prefix_lengths", "prefix_seed", "prefix_context")


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


class TargetCache:
    """Each request's target z on disk, so that a long batch (1,000 edits: hours on a CPU) resumes
    where it stopped. Keyed by the current weights (an earlier edit changes them), the device, the
    top layer and the value-step settings; one file per request."""

    def __init__(self, lm: LoadedModel, settings: MemitSettings, top: int, cache_dir: Path | None):
        key = {"weights": weights_fingerprint(lm.model), "device": str(lm.device), "layer": top,
               "settings": {name: getattr(settings, name) for name in TARGET_FIELDS}}
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


def memit_delta(lm: LoadedModel, requests: list[EditRequest], settings: MemitSettings, *, cache_dir=None,
                progress: Phases | None = None) -> tuple[EditDelta, list[dict]]:
    """`progress`: the phases (factedit.progress): key statistics, context prefixes, then the value
    optimisation of the requests' targets, counted in requests."""
    layers = sorted(settings.layers)
    top = layers[-1]
    C = _statistics(lm, settings, cache_dir, progress)
    templates = context_templates(lm, settings, cache_dir, progress=progress)
    # 1. target hidden states z at the top layer, optimised for several requests at once
    targets_done = start_phase(progress, OPTIMISATION, len(requests), "request")
    found = _targets(lm, requests, settings, top, templates, TargetCache(lm, settings, top, cache_dir), targets_done)
    z = torch.stack([f["z"] for f in found], 1).to(lm.device).double()  # (d, n)
    diagnostics = [{key: value for key, value in f.items() if key != "z"} for f in found]
    # 2. spread the change over the layers, lowest first, each on the model updated so far
    stack, total = EditStack(lm), None
    try:
        for i, layer in enumerate(layers):
            keys = torch.stack([io_at_subject(lm, "mlp", layer, r, templates)[0].mean(0) for r in requests], 1)
            current = torch.stack([io_at_subject(lm, "hidden", top, r, templates[:1])[1][0] for r in requests], 1)
            K = keys.double()
            wanted = (z - current.double()) / (len(layers) - i)  # this layer's share of the block-output change
            residual = _as_mlp_change(lm, layer, requests, wanted, templates[0], diagnostics)
            A = settings.mom2_update_weight * C[layer].double() + K @ K.T
            down = torch.linalg.solve(A, K).T  # (n, d_mlp): Delta W = residual @ down
            name = f"{lm.arch.blocks_name}.{layer}.{lm.arch.blocks[layer].mlp_out_name}"
            delta = EditDelta("memit", lm.fingerprint, {name: {"up": residual.float().cpu(), "down": down.float().cpu()}},
                              settings.to_dict(), [r.to_dict() for r in requests])
            stack.apply(delta)
            total = delta if total is None else total.compose(delta)
    finally:
        stack.revert_all()
    total.method = "memit"
    total.requests = [r.to_dict() for r in requests]
    return total, diagnostics
