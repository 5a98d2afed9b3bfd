"""Knowledge neurons (Dai et al. 2022) as the ROME paper's KN baseline.

1. Attribution: integrated gradients of p(true target's first token) at the prompt's last position
   with respect to each MLP neuron's activation (the key entering the output projection), one layer
   at a time, the activation scaled from 0 to its value in `ig_steps` steps (one batch per layer).
2. Neurons: those whose attribution exceeds `threshold` x the largest one (at most `max_neurons`).
3. Edit: each selected neuron's value vector (its column of the output projection) gets
   `scale` x (embedding(new) - embedding(old)) added, the rewrite of the knowledge-neurons
   reference implementation (scale 2, input word embeddings), times the sign of the neuron's
   activation at the prompt (see `follow_activation_sign`), divided by the activation's size at the
   prompt (see `per_unit_activation`).

The reference's scale is absolute: what a neuron adds is its activation times the change, so the
same scale adds about 2 x (e_new - e_old) through a GPT-2 neuron (activations of order 1) and up to
380 x (e_new - e_old) through SmolLM2's late neurons (activations up to +-190), which then push the
new object after every prompt. The default divides by the activation at the prompt, so that each kept neuron adds
`scale` x (e_new - e_old) there whatever the model's activation scale; the "paper" preset is the
reference rule (absolute, sign ignored).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from ..hooks import Hook
from ..models import LoadedModel
from ..placement import read_weight
from ..progress import Phases, start_phase
from ..settings import JsonSettings, bounded
from .delta import EditDelta
from ..request import EditRequest, target_ids


@dataclass
class KnSettings(JsonSettings):
    ig_steps: int = bounded(20, at_least=1)
    # keep neurons with attribution > threshold x max (1 or more would keep none)
    threshold: float = bounded(0.2, at_least=0, below=1)
    max_neurons: int = bounded(20, at_least=1)
    scale: float = bounded(2.0, above=0)  # 0 changes nothing; below 0 would write the old object back
    # The reference rule adds the change whatever the sign of the neuron's activation: right for
    # GPT-2's GELU neurons (almost never negative), backwards for a gated MLP's negative ones, which
    # then push towards the old object. True: multiply by the sign of the activation at the prompt.
    follow_activation_sign: bool = True
    # True: divide each neuron's change by |its activation at the prompt| (scale-aware, see above).
    per_unit_activation: bool = True
    layers: list[int] | None = bounded(None, at_least=0)  # None: every layer
    preset: str = "default"

    @classmethod
    def defaults_for(cls, lm: LoadedModel, layer: int | None = None, **overrides) -> "KnSettings":
        return cls(layers=[layer] if layer is not None else None, **overrides)


def last_token_activations(lm: LoadedModel, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, bool]:
    """The layer's MLP neuron activations (the keys entering the output projection) at the last
    position (d_mlp,), and whether the model flattens tokens before that projection (OPT)."""
    with Hook(lm.arch.blocks[layer].mlp_out, keep_input=True, stop=True) as hook, torch.no_grad():
        lm.model(input_ids=ids, use_cache=False)
    return hook.input.reshape(1, ids.shape[1], -1)[0, -1].to(lm.device), hook.input.dim() != 3


def neuron_attributions(lm: LoadedModel, prompt: str, target_token: int, layer: int, steps: int) -> torch.Tensor:
    """Integrated-gradients attribution of each of the layer's MLP neurons (d_mlp,)."""
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids.to(lm.device)
    module = lm.arch.blocks[layer].mlp_out
    activation, flattened = last_token_activations(lm, ids, layer)
    alphas = torch.linspace(0, 1, steps + 1, device=lm.device)[1:]  # right Riemann sum
    scaled = (alphas[:, None] * activation[None]).requires_grad_(True)

    def replace_last(keys: torch.Tensor) -> torch.Tensor:
        keys = keys.reshape(steps, ids.shape[1], -1).clone()
        keys[:, -1] = scaled.to(keys.device, keys.dtype)
        return keys.reshape(hook_shape) if hook_shape is not None else keys

    hook_shape = (steps * ids.shape[1], -1) if flattened else None  # OPT flattens tokens
    flags = {p: p.requires_grad for p in lm.model.parameters()}
    try:
        for p in lm.model.parameters():
            p.requires_grad_(False)
        with Hook(module, edit_input=replace_last):
            logits = lm.model(input_ids=ids.expand(steps, -1), use_cache=False, logits_to_keep=1).logits
        probs = torch.softmax(logits[:, -1].float(), -1)[:, target_token]
        (grad,) = torch.autograd.grad(probs.sum(), scaled)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return (activation * grad.mean(0)).detach()


# Named settings beside the per-model defaults (preset name -> field values; the registry's presets).
# "paper": the reference rule (knowledge-neurons code as the ROME paper ran it).
PRESETS = {"paper": {"scale": 2.0, "follow_activation_sign": False, "per_unit_activation": False, "ig_steps": 20,
                     "threshold": 0.2}}


def neuron_weight(activation: float, settings: KnSettings) -> float:
    """How much of scale x (e_new - e_old) goes into one neuron's value vector, given its activation
    at the prompt."""
    weight = -1.0 if settings.follow_activation_sign and activation < 0 else 1.0
    if settings.per_unit_activation:
        weight /= max(abs(activation), 1e-6)
    return weight


def kn_delta(lm: LoadedModel, requests: list[EditRequest], settings: KnSettings, *, cache_dir=None,
             progress: Phases | None = None, history=None) -> tuple[EditDelta, list[dict]]:
    """Steps 1-3 of the module docstring for each request; the deltas composed. `progress`: the
    phases (factedit.progress), here one, counted in requests. (`cache_dir` and `history` are not
    used.)"""
    done = start_phase(progress, "knowledge neurons", len(requests), "request")
    embed = read_weight(lm.arch.embed)
    layers = settings.layers if settings.layers is not None else list(range(lm.n_layers))
    total, diagnostics = None, []
    for request in requests:
        if request.target_true is None:
            raise InputError("knowledge neurons need the true target (the fact to find neurons for)")
        old = target_ids(lm.tokenizer, request.target_true)[0]
        new = target_ids(lm.tokenizer, request.target_new)[0]
        scores = torch.stack([neuron_attributions(lm, request.text, old, layer, settings.ig_steps) for layer in layers])
        flat = scores.flatten()
        keep = (flat > settings.threshold * flat.max()).nonzero().squeeze(1)
        keep = keep[flat[keep].argsort(descending=True)][:settings.max_neurons]
        direction = settings.scale * (embed[new] - embed[old]).detach().float().cpu()
        changes = {}
        ids = lm.tokenizer(request.text, return_tensors="pt").input_ids.to(lm.device)
        kept = [(layers[index // scores.shape[1]], index % scores.shape[1]) for index in keep.tolist()]
        activations = {layer: last_token_activations(lm, ids, layer)[0] for layer in {layer for layer, _ in kept}}
        for layer, neuron in kept:
            name = lm.arch.mlp_out_path(layer)
            down = changes.setdefault(name, {"up": direction.unsqueeze(1), "down": torch.zeros(1, lm.arch.d_mlp)})["down"]
            down[0, neuron] = neuron_weight(float(activations[layer][neuron]), settings)
        delta = EditDelta("kn", lm.fingerprint, changes, settings.to_dict(), [request.to_dict()])
        total = delta if total is None else total.compose(delta)
        diagnostics.append({"neurons": kept})
        done(1)
    return total, diagnostics


def report_lines(delta: EditDelta, diagnostics: list[dict], settings: KnSettings) -> list[str]:
    """What to tell a person about a knowledge-neuron edit beyond its effect: the neurons rewritten."""
    return [f"knowledge neurons rewritten: {', '.join(f'layer {layer} #{neuron}' for layer, neuron in d['neurons'])}"
            + ("" if len(diagnostics) == 1 else f" ({number + 1}. request)")
            for number, d in enumerate(diagnostics) if d.get("neurons")]
