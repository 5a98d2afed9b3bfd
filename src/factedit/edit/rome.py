"""ROME (Meng et al. 2022, section 3): a rank-one update of one MLP output matrix.

The method in its natural steps, each usable alone:

1. `context_templates`: "{}" plus short texts sampled from the model, as prefixes ("<text>. {}").
2. `compute_keys`: the MLP key (input of the output projection) and value (its output) at the
   subject's last token, for every prefixed prompt; their averages.
3. `compute_value_delta`: optimise a vector added to the MLP output at the subject's last token so
   that the model predicts the new target, keeping "{subject} is a" close to the original (KL).
4. `solve_rank_one`: W' = W + (v* - W k)(C^-1 k)^T / ((C^-1 k)^T k) against the key statistics C.

Two variants share all of it (see `RomeSettings.key_mode`):
* "consistent" (method `rome`, default): the averaged key k and averaged value W k are used in every
  step, which later work showed avoids the "disabling" edits that make the model collapse.
* "original" (method `rome-original`): the reference implementation's mix: direction C^-1 k_avg
  but residual and denominator from the plain prompt's key.
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
from ..models import LoadedModel, cache_root, check_seed
from ..progress import PREFIXES, Phases, start_phase
from ..stats import Corpus, StatisticsSettings, corpus_from, model_sampled_corpus, second_moment
from .delta import EditDelta
from .mlp_change import response_clamp
from .prompts import io_at_subject
from ..request import EditRequest
from .value import ValueSettings, compute_value_delta
from ..settings import bounded, one_of


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


def edit_layer(lm: LoadedModel, layer: int | None = None) -> tuple[int, str]:
    """The layer single-layer editors use, and how it was chosen. Without a layer: n_layers // 6
    (SmolLM2: 5), inside the early MLP site that causal tracing finds on the models here;
    `factedit suggest-layer` measures it for a new model."""
    if layer is None:
        layer, rule = max(0, lm.n_layers // 6), "n_layers // 6 (structural default; see suggest-layer)"
    else:
        rule = "given"
    return lm.check_layer(layer), rule


CLAMP_RULE = "largest factor <= 4 at which the block passes on 0.9 of the change (mlp_change.response_clamp)"


def clamp_for_block(lm: LoadedModel, layer: int) -> float:
    """The reference's clamp (4 x ||v||) where the block passes a change of the MLP output on as it is;
    where a norm follows the MLP (Gemma), the largest factor at which the block still passes on 0.9 of
    a change's linearised effect. Beyond it the edit saturates at its subject while the neighbours,
    which receive a small share of the change, do not, so the share of the edit that reaches them
    grows by 1 / response (here at most 1.11x). On Gemma 3 at layer 3, CounterFact neighbourhood
    success with the reference's 4: 40, with 1.12 (response 0.75): 56, with this rule's 0.62: 62
    (unedited 69.5; docs/results.md 8.9)."""
    return response_clamp(lm, layer, ceiling=4.0, keep=0.9)


# The reference implementation's settings for GPT-2 XL (hparams/ROME/gpt2-xl.json), by name.
PAPER_SETTINGS = {"v_lr": 0.5, "v_steps": 20, "v_weight_decay": 0.5, "clamp_norm_factor": 4.0, "kl_factor": 0.0625,
                  "early_stop_loss": 0.05, "early_stop_on": "total", "prefix_lengths": [[5, 10], [10, 10]],
                  "prefix_context": "", "value_through_update": False,
                  "clamp_rule": "the reference's 4"}


# ------------------------------------------------------------------------------ 1. context templates

def context_templates(lm: LoadedModel, settings: RomeSettings, cache_dir: Path | None = None, *,
                      progress: Phases | None = None) -> list[str]:
    """["{}"] + ["<sampled text>. {}", ...], sampled once per model and seed, cached on disk; the
    sampling is phase progress.PREFIXES, counted in tokens."""
    from ..generate import sample_texts, sampled_tokens

    check_seed(settings.prefix_seed, "prefix_seed")
    starts = ["The", "Therefore", "Because", "I", "You"]
    spec = "-".join(f"{n}x{length}" for length, n in settings.prefix_lengths)
    if settings.prefix_context:
        spec += "_after-" + hashlib.sha256(settings.prefix_context.encode()).hexdigest()[:8]
    path = cache_root(cache_dir) / "prefixes" / f"{lm.fingerprint}_seed{settings.prefix_seed}_{spec}.json"
    cached = read_cached(path, lambda p: json.loads(p.read_text()))
    # What this function writes: "{}" first, then one template per sampled text, each with one "{}".
    expected = 1 + sum(max(1, count // len(starts)) * len(starts) for _, count in settings.prefix_lengths)
    if isinstance(cached, list) and len(cached) == expected and cached[0] == "{}" \
            and all(isinstance(t, str) and t.count("{}") == 1 for t in cached):
        return cached
    total = sum(sampled_tokens(lm, starts, max(1, count // len(starts)), length, settings.prefix_context)
                for length, count in settings.prefix_lengths)
    step = start_phase(progress, PREFIXES, total, "tok")
    templates = ["{}"]
    for length, count in settings.prefix_lengths:
        texts = sample_texts(lm, starts, max(1, count // len(starts)), length, top_k=5,
                             seed=settings.prefix_seed * 100 + length, context=settings.prefix_context, progress=step)
        templates += [t.replace("{", " ").replace("}", " ").strip() + ". {}" for t in texts]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda partial: partial.write_text(json.dumps(templates, indent=1)))
    return templates


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
                   v_target: torch.Tensor, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of Delta W = right left^T with Delta W k_residual = v_target - v_current and the
    update direction C^-1 k_direction (see update_left)."""
    left = update_left(C, k_direction, k_residual, ridge)
    right = (v_target - v_current).double()
    return left.float(), right.float().to(left.device)


# -------------------------------------------------------------------------------------- the editor

def statistics_corpus(lm: LoadedModel, settings, progress: Phases | None = None) -> Corpus:
    """The corpus for the key statistics: the settings' source, else $FACTEDIT_STATS_CORPUS, else
    text sampled from the model itself (its name says so: model-sampled-seedN; `progress` hears of
    the sampling)."""
    import os

    source = settings.stats_corpus or os.environ.get("FACTEDIT_STATS_CORPUS")
    return corpus_from(source) if source else model_sampled_corpus(lm, seed=settings.prefix_seed, progress=progress)


def key_statistics(lm: LoadedModel, settings: RomeSettings, *, cache_dir: Path | None = None,
                   progress: Phases | None = None, sum_chunks=None):
    """C at the settings' layer, from the disk cache or computed (phases progress.SAMPLING where the
    model's own text is the corpus, then progress.STATISTICS). Returns (stats, path, cache hit).
    `sum_chunks`: what sums k k^T when not cached (stats.collect_second_moments; e.g. sharded over workers)."""
    corpus = statistics_corpus(lm, settings, progress)
    return second_moment(lm, settings.layer, corpus, settings.stats_tokens, cache_dir=cache_dir, progress=progress,
                         sum_chunks=sum_chunks)


def update_shares(lm: LoadedModel, request: EditRequest, settings: RomeSettings, keys: Keys,
                  left: torch.Tensor) -> torch.Tensor:
    """The share of the edit's change each prompt of the value step will receive from the rank-one
    update with direction `left` (update_left): left^T k at its key, one per template, then the
    essence prompt. Not 1 everywhere: on SmolLM2 a subject at the very start of the text (position 0,
    which the model uses as an attention sink) can have a key that receives as little as 7% of an
    update made for the key averaged over contexts (docs/results.md 8.8)."""
    essence = EditRequest.create(settings.essence_prompt, request.subject, request.target_new)
    k_essence = io_at_subject(lm, "mlp", settings.layer, essence, ["{}"])[0]
    return (torch.cat([keys.k_each, k_essence]).double().to(left.device) @ left).float()


def rome_delta(lm: LoadedModel, request: EditRequest, settings: RomeSettings, C: torch.Tensor,
               templates: list[str], *, progress: Callable[[int], None] | None = None,
               forward: str = "cached") -> tuple[EditDelta, dict]:
    """The rank-one edit for one request (the model is not modified)."""
    layer = settings.layer
    keys = compute_keys(lm, layer, request, templates)
    if settings.key_mode not in ("consistent", "original"):
        raise InputError(f"unknown key_mode {settings.key_mode!r}; expected consistent or original")
    # The value the update is written for, and its key: averaged (consistent) or the plain prompt's.
    v_current = keys.v_avg if settings.key_mode == "consistent" else keys.v_plain
    k_residual = keys.k_avg if settings.key_mode == "consistent" else keys.k_plain
    left = update_left(C, keys.k_avg, k_residual, settings.ridge)  # solved once: the shares need it too
    shares = update_shares(lm, request, settings, keys, left) if settings.value_through_update else None
    value = compute_value_delta(lm, layer, request, templates, settings, v_current, forward=forward,
                                row_scales=shares, progress=progress)
    right = (value.target_init + value.delta - v_current).double()  # what solve_rank_one computes
    left, right = left.float(), right.float().to(left.device)
    name = lm.arch.mlp_out_path(layer)
    method = "rome" if settings.key_mode == "consistent" else "rome-original"
    delta = EditDelta(method, lm.fingerprint, {name: {"up": right.unsqueeze(1).cpu(), "down": left.unsqueeze(0).cpu()}},
                      settings.to_dict(), [request.to_dict()])
    return delta, {**value.diagnostics(), "value_norm": float(value.target_init.norm())}
