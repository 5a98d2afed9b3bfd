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

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from ..hooks import Hook, Hooks
from ..models import LoadedModel, default_cache_dir
from ..stats import corpus_from, model_sampled_corpus, second_moment
from ..tokens import span_token_range
from ..trace.runs import forward_kwargs
from .delta import EditDelta
from .request import EditRequest, target_ids


@dataclass
class RomeSettings:
    layer: int
    key_mode: str = "consistent"  # "consistent" (rome) or "original" (rome-original)
    v_lr: float = 0.5
    v_steps: int = 20
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    essence_prompt: str = "{} is a"
    prefix_lengths: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])  # [tokens, count]
    prefix_seed: int = 0
    stats_corpus: str | None = None  # text/JSONL/folder/"wikitext"; None: $FACTEDIT_STATS_CORPUS or model text
    stats_tokens: int = 100_000
    ridge: float = 1e-4  # added to C's diagonal, relative to its mean diagonal (conditioning)
    layer_rule: str = ""  # how the layer was chosen, for the record

    @classmethod
    def defaults_for(cls, lm: LoadedModel, layer: int | None = None, **overrides) -> "RomeSettings":
        """Per-model defaults derived from the model's structure.

        Without a layer: n_layers // 6 (SmolLM2: 5), inside the early MLP site that causal tracing finds
        on the models here; `factedit suggest-layer` measures it for a new model."""
        if layer is None:
            layer, rule = max(0, lm.n_layers // 6), "n_layers // 6 (structural default; see suggest-layer)"
        else:
            rule = "given"
        if not 0 <= layer < lm.n_layers:
            raise ValueError(f"layer {layer} out of range: the model has {lm.n_layers} layers (0..{lm.n_layers - 1})")
        return cls(layer=layer, layer_rule=rule, **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RomeSettings":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ROME settings: {', '.join(sorted(unknown))}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "RomeSettings":
        return cls.from_dict(json.loads(Path(path).read_text()))


# ------------------------------------------------------------------------------ 1. context templates

def context_templates(lm: LoadedModel, settings: RomeSettings, cache_dir: Path | None = None) -> list[str]:
    """["{}"] + ["<sampled text>. {}", ...], sampled once per model and seed, cached on disk."""
    from ..generate import sample_texts

    spec = "-".join(f"{n}x{length}" for length, n in settings.prefix_lengths)
    path = (cache_dir or default_cache_dir()) / "prefixes" / f"{lm.fingerprint}_seed{settings.prefix_seed}_{spec}.json"
    if path.exists():
        return json.loads(path.read_text())
    starts = ["The", "Therefore", "Because", "I", "You"]
    templates = ["{}"]
    for length, count in settings.prefix_lengths:
        texts = sample_texts(lm, starts, max(1, count // len(starts)), length, top_k=5,
                             seed=settings.prefix_seed * 100 + length)
        templates += [t.replace("{", " ").replace("}", " ").strip() + ". {}" for t in texts]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(templates, indent=1))
    return templates


# ------------------------------------------------------------------------------------- 2. the keys

@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded: causal attention never looks at the padding
    lengths: list[int]
    subject_last: list[int]  # index of the subject's last token per row


def fill(template: str, request_text: str, subject_start: int, subject: str) -> tuple[str, tuple[int, int]]:
    """Put the request's text into a context template; returns the text and the subject's characters
    (known exactly: a sampled prefix may mention the subject too)."""
    at = template.index("{}")
    start = at + subject_start
    return template.replace("{}", request_text, 1), (start, start + len(subject))


def prompt_batch(lm: LoadedModel, texts: list[tuple[str, tuple[int, int]]],
                 suffixes: list[list[int]] | None = None) -> Batch:
    """Tokenise (text, subject span) pairs, append suffix ids, right-pad into one batch."""
    rows, last = [], []
    for i, (text, (start, end)) in enumerate(texts):
        ids = list(lm.tokenizer(text)["input_ids"])
        last.append(span_token_range(lm.tokenizer, text, ids, start, end)[1] - 1)
        rows.append(ids + (suffixes[i] if suffixes else []))
    width = max(len(r) for r in rows)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=lm.device)
    return Batch(ids, [len(r) for r in rows], last)


def request_texts(request: EditRequest, templates: list[str]) -> list[tuple[str, tuple[int, int]]]:
    subject_start = request.prompt.index("{}")
    return [fill(template, request.text, subject_start, request.subject) for template in templates]


@dataclass
class Keys:
    k_avg: torch.Tensor  # (d_mlp,) mean key over the templates
    v_avg: torch.Tensor  # (d,) mean MLP output there
    k_plain: torch.Tensor  # key of the plain prompt (template "{}")
    v_plain: torch.Tensor


@torch.no_grad()
def compute_keys(lm: LoadedModel, layer: int, request: EditRequest, templates: list[str]) -> Keys:
    batch = prompt_batch(lm, request_texts(request, templates))
    module = lm.arch.blocks[layer].mlp_out
    with Hook(module, keep_input=True, keep_output=True, stop=True) as hook:
        lm.model(input_ids=batch.input_ids, use_cache=False)
    n, width = batch.input_ids.shape
    keys = hook.input.reshape(n, width, -1)
    values = hook.output.reshape(n, width, -1)
    rows = torch.arange(n)
    index = torch.tensor(batch.subject_last)
    k, v = keys[rows, index].float(), values[rows, index].float()
    return Keys(k.mean(0), v.mean(0), k[0], v[0])


# ----------------------------------------------------------------------------------- 3. the value

@dataclass
class ValueResult:
    delta: torch.Tensor  # (d,) the change to the MLP output
    target_init: torch.Tensor  # the value it is added to
    losses: list[float]
    steps: int


def _lower_block_skips(lm: LoadedModel, layer: int, input_ids: torch.Tensor) -> list[Hook]:
    """Blocks below `layer` do not depend on the optimised vector: run them once, then reuse the
    output of block layer-1 (whatever the lower blocks return is ignored by the next skipped one)."""
    if layer == 0:
        return []
    captured = []
    handle = lm.arch.blocks[layer - 1].block.register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        with Hook(lm.arch.blocks[layer - 1].block, stop=True), torch.no_grad():
            lm.model(input_ids=input_ids, use_cache=False)
    finally:
        handle.remove()
    below = captured[0]
    return [Hook(lm.arch.blocks[i].block, skip=lambda *args, **kwargs: below) for i in range(layer)]


def compute_value_delta(lm: LoadedModel, layer: int, request: EditRequest, templates: list[str],
                        settings: RomeSettings, keys: Keys, *, reuse_lower_layers: bool = True,
                        progress: Callable[[int], None] | None = None) -> ValueResult:
    target = target_ids(lm.tokenizer, request.target_new)
    texts = request_texts(request, templates)
    texts.append(fill(settings.essence_prompt, request.subject, 0, request.subject))
    n_rewrite = len(texts) - 1
    batch = prompt_batch(lm, texts, suffixes=[target[:-1]] * n_rewrite + [[]])
    input_ids, lookup = batch.input_ids, batch.subject_last
    rows = range(len(texts))

    # Positions whose logits the loss reads: the target tokens of each rewrite row, the essence row's
    # subject token. Logits are computed only there when the model allows it.
    target_positions = [[n - len(target) + j for j in range(len(target))] for n in batch.lengths[:n_rewrite]]
    needed = sorted({p for ps in target_positions for p in ps} | {lookup[-1]})
    column = {p: i for i, p in enumerate(needed)}
    names = forward_kwargs(lm.model)
    kwargs = {"use_cache": False}
    if names["logits_to_keep"] and reuse_lower_layers:
        kwargs[names["logits_to_keep"]] = torch.tensor(needed, device=lm.device)
    else:
        column = {p: p for p in needed}
    target_tensor = torch.tensor(target, device=lm.device)

    target_init = (keys.v_avg if settings.key_mode == "consistent" else keys.v_plain).to(lm.device)
    delta = torch.zeros_like(target_init, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=settings.v_lr)
    row_index = torch.arange(len(rows), device=lm.device)
    lookup_tensor = torch.tensor(lookup, device=lm.device)

    def add_delta(output):
        output = output.clone()
        flat = output.dim() == 2  # some models flatten tokens
        view = output.view(len(rows), -1, output.shape[-1]) if flat else output
        view[row_index, lookup_tensor] += delta.to(output.dtype)
        return output

    hooks = [Hook(lm.arch.blocks[layer].mlp_out, edit_output=add_delta)]
    if reuse_lower_layers:
        hooks += _lower_block_skips(lm, layer, input_ids)
    requires_grad = {p: p.requires_grad for p in lm.model.parameters()}
    for p in lm.model.parameters():
        p.requires_grad_(False)
    losses, initial_essence, steps = [], None, 0
    try:
        with Hooks(hooks):
            for step in range(settings.v_steps):
                logits = lm.model(input_ids=input_ids, **kwargs).logits.float()
                log_probs = torch.log_softmax(logits, dim=-1)
                nll = torch.stack([
                    -log_probs[i, [column[p] for p in target_positions[i]], target_tensor].sum() / len(target)
                    for i in range(n_rewrite)]).mean()
                essence_lp = log_probs[-1, column[lookup[-1]]].unsqueeze(0)
                if initial_essence is None:
                    initial_essence = essence_lp.detach().clone()
                kl = settings.kl_factor * torch.nn.functional.kl_div(initial_essence, essence_lp, log_target=True,
                                                                      reduction="batchmean")
                decay = settings.v_weight_decay * (delta.norm() / target_init.norm() ** 2)
                loss = nll + kl + decay
                losses.append(float(loss))
                steps = step + 1
                if progress:
                    progress(1)
                if float(loss) < settings.early_stop_loss or step == settings.v_steps - 1:
                    break
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    max_norm = settings.clamp_norm_factor * target_init.norm()
                    if delta.norm() > max_norm:
                        delta.mul_(max_norm / delta.norm())
    finally:
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
    return ValueResult(delta.detach(), target_init.detach(), losses, steps)


# ------------------------------------------------------------------------------------ 4. the solve

def solve_rank_one(C: torch.Tensor, k_direction: torch.Tensor, k_residual: torch.Tensor, v_current: torch.Tensor,
                   v_target: torch.Tensor, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of Delta W = right left^T with Delta W k_residual = v_target - v_current and the
    update direction C^-1 k_direction. Solved in float64; `ridge` x mean(diag C) is added to C."""
    C = C.double()
    if ridge:
        C = C + ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    u = torch.linalg.solve(C, k_direction.double().to(C.device))
    denominator = u @ k_residual.double().to(C.device)
    if denominator.abs() < 1e-12:
        raise ValueError("degenerate ROME update: (C^-1 k)^T k is zero")
    left = u / denominator
    right = (v_target - v_current).double()
    return left.float(), right.float().to(left.device)


# -------------------------------------------------------------------------------------- the editor

def key_statistics(lm: LoadedModel, settings: RomeSettings, *, cache_dir: Path | None = None,
                   progress: Callable[[int], None] | None = None):
    import os

    source = settings.stats_corpus or os.environ.get("FACTEDIT_STATS_CORPUS")
    corpus = corpus_from(source) if source else model_sampled_corpus(lm, seed=settings.prefix_seed)
    return second_moment(lm, settings.layer, corpus, settings.stats_tokens, cache_dir=cache_dir, progress=progress)


def rome_delta(lm: LoadedModel, request: EditRequest, settings: RomeSettings, C: torch.Tensor,
               templates: list[str], *, progress: Callable[[int], None] | None = None,
               reuse_lower_layers: bool = True) -> tuple[EditDelta, dict]:
    """The rank-one edit for one request (the model is not modified)."""
    layer = settings.layer
    keys = compute_keys(lm, layer, request, templates)
    value = compute_value_delta(lm, layer, request, templates, settings, keys, progress=progress,
                                reuse_lower_layers=reuse_lower_layers)
    v_target = value.target_init + value.delta
    if settings.key_mode == "consistent":
        left, right = solve_rank_one(C, keys.k_avg, keys.k_avg, keys.v_avg, v_target, settings.ridge)
    elif settings.key_mode == "original":
        left, right = solve_rank_one(C, keys.k_avg, keys.k_plain, keys.v_plain, v_target, settings.ridge)
    else:
        raise ValueError(f"unknown key_mode {settings.key_mode!r}; expected consistent or original")
    name = f"{lm.arch.blocks_name}.{layer}.{lm.arch.blocks[layer].mlp_out_name}"
    method = "rome" if settings.key_mode == "consistent" else "rome-original"
    delta = EditDelta(method, lm.fingerprint, {name: {"up": right.unsqueeze(1).cpu(), "down": left.unsqueeze(0).cpu()}},
                      settings.to_dict(), [request.to_dict()])
    return delta, {"losses": value.losses, "steps": value.steps, "delta_norm": float(value.delta.norm()),
                   "value_norm": float(value.target_init.norm())}
