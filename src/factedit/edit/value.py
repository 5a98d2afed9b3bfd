"""ROME step 3: the new value v* = v + delta, found by optimising delta.

delta is added to the MLP output at the subject's last token of every prefixed prompt. The loss is
the target's negative log-likelihood (target tokens only), plus a KL term keeping the distribution
after "{subject} is a" as it was (essence), plus weight decay; the norm of delta is clamped to a
multiple of the original value's norm. Adam, early stop (the reference implementation's loop).

Two ways to run the forward passes give the same numbers:
* `full`: the whole batch through the whole model at each step (the simple reference);
* `cached` (default): nothing before the subject's last token depends on delta, so those tokens run
  once into a key/value cache (rows left-padded to a common prefix), the blocks below the edited
  layer run once, and each step computes only the rest, with logits only where the loss reads them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..hooks import Hook, Hooks
from ..kv_cache import forward_kwargs, output_cache
from ..models import SEED_MAX, LoadedModel
from ..request import EditRequest, target_ids
from ..settings import JsonSettings, bounded, one_of

# When a value's optimisation stops early. "total" is the reference's: the whole objective below
# early_stop_loss, whose weight-decay term grows with the size of delta (0.5 ||delta|| / ||v||^2, about
# 0.04 for an edit that needs 3 x the value's norm), so that an edit needing a large change may never
# get below 0.05 however well it predicts the target. "nll": the prediction part alone (the target's
# mean negative log-likelihood over the prompts) below early_stop_loss, which is what convergence
# should mean. "top": ENCORE's most-probable early stopping (MPES): every token of the target is the
# most likely one at its place on every prompt, at early_stop_steps steps (counted, as in the
# reference, whether or not they follow each other); early_stop_loss is not read.
EARLY_STOP_CRITERIA = ("nll", "total", "top")


@dataclass(kw_only=True)
class ValueSettings(JsonSettings):
    """The value optimisation's settings, one set for every editor that optimises a value (ROME's v*,
    MEMIT's and AlphaEdit's targets z). Editors derive from it and may change the defaults."""

    v_lr: float = bounded(0.5, above=0)
    # The optimisation runs until its loss is below early_stop_loss, for at most v_steps steps. The
    # reference's 20-25 (tuned for GPT-2 XL and GPT-J) leave many zsRE and some CounterFact edits
    # unconverged on the small models here; see benchmarks/convergence.py and the "paper" presets.
    v_steps: int = bounded(100, at_least=1)
    v_weight_decay: float = bounded(0.5, at_least=0)
    clamp_norm_factor: float = bounded(4.0, above=0)  # ||delta|| <= clamp_norm_factor x ||value||
    kl_factor: float = bounded(0.0625, at_least=0)
    early_stop_loss: float = bounded(0.05, at_least=0)
    # "nll": the target's NLL; "total": the whole objective (reference; see EARLY_STOP_CRITERIA)
    early_stop_on: str = one_of("nll", EARLY_STOP_CRITERIA)
    early_stop_steps: int = bounded(2, at_least=1)  # "top": the steps the target must lead at
    essence_prompt: str = "{} is a"
    # [tokens, count] pairs
    prefix_lengths: list[list[int]] = bounded(default_factory=lambda: [[5, 10], [10, 10]], at_least=1, item_length=2)
    prefix_seed: int = bounded(0, at_least=0, at_most=SEED_MAX)
    # Text the prefixes are sampled after when the tokenizer adds no start-of-text token (see
    # generate.sample_texts); "" samples from the bare start word, as the reference did.
    prefix_context: str = "\n"

    def value_settings(self) -> dict:
        """These fields alone: what, with the weights, determines an optimised value (cache keys)."""
        from dataclasses import fields

        return {f.name: getattr(self, f.name) for f in fields(ValueSettings)}


@dataclass
class ValueResult:
    delta: torch.Tensor  # (d,) the change to the MLP output
    target_init: torch.Tensor  # the value it is added to
    losses: list[float]  # the whole objective at each step
    steps: int
    converged: bool  # the early-stop criterion was met within the step budget
    nlls: list[float] = field(default_factory=list)  # its prediction part: the target's mean NLL

    def diagnostics(self) -> dict:
        """What an edit reports about its optimisation: steps taken, final loss, whether it converged."""
        return {"steps": self.steps, "final_loss": self.losses[-1] if self.losses else None,
                "final_nll": self.nlls[-1] if self.nlls else None, "converged": self.converged,
                "losses": self.losses, "delta_norm": float(self.delta.norm())}



@dataclass
class ValueRows:
    """Every prompt of every request, split at the subject's last token (where delta is added)."""

    prefixes: list[list[int]]  # tokens before the subject's last token
    suffixes: list[list[int]]  # the subject's last token and everything after (incl. target[:-1])
    row_request: list[int]  # which request each row belongs to
    target_positions: dict[int, list[int]]  # rewrite row -> suffix positions whose logits predict the target
    essence_rows: list[int]  # per request, its "{subject} is a" row
    targets: list[list[int]]  # per request, the new target's token ids

    def rewrite_rows(self, request: int) -> list[int]:
        return [row for row, r in enumerate(self.row_request) if r == request and row in self.target_positions]

    def loss_entries(self) -> list[tuple[int, int]]:
        """(row, suffix position) of every logit the loss reads, in the order the forwards return
        them: a rewrite row's target positions, an essence row's subject token."""
        return [(row, p) for row in range(len(self.prefixes)) for p in self.target_positions.get(row, [0])]


def value_rows(lm: LoadedModel, requests: list[EditRequest], templates: list[str], essence_prompt: str) -> ValueRows:
    from ..tokens import span_token_range
    from .prompts import fill, request_texts

    rows = ValueRows([], [], [], {}, [], [])
    for r, request in enumerate(requests):
        target = target_ids(lm.tokenizer, request.target_new)
        rows.targets.append(target)
        texts = request_texts(request, templates) + [fill(essence_prompt, request.subject, 0, request.subject)]
        for i, (text, (start, end)) in enumerate(texts):
            ids = list(lm.tokenizer(text)["input_ids"])
            last = span_token_range(lm.tokenizer, text, ids, start, end)[1] - 1
            rewrite = i < len(texts) - 1
            full = ids + (target[:-1] if rewrite else [])
            row = len(rows.prefixes)
            rows.prefixes.append(full[:last])
            rows.suffixes.append(full[last:])
            rows.row_request.append(r)
            if rewrite:
                rows.target_positions[row] = [len(ids) - 1 + j - last for j in range(len(target))]
            else:
                rows.essence_rows.append(row)
    return rows


def _pad_id(lm: LoadedModel) -> int:
    return lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0


class FullForward:
    """Reference: right-padded prefix+suffix rows through the whole model, full logits."""

    def __init__(self, lm: LoadedModel, rows: ValueRows, layer: int, kind: str = "mlp"):
        self.lm, self.rows = lm, rows
        full = [p + s for p, s in zip(rows.prefixes, rows.suffixes)]
        width = max(len(r) for r in full)
        self.input_ids = torch.tensor([r + [_pad_id(lm)] * (width - len(r)) for r in full], device=lm.device)
        self.edit_positions = torch.tensor([len(p) for p in rows.prefixes], device=lm.device)
        self.offsets = [len(p) for p in rows.prefixes]
        self.module = lm.arch.module(kind, layer)

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (entries, vocab) at `rows.loss_entries()`; `delta`: (rows, d), one
        vector per row."""
        n = self.input_ids.shape[0]
        with Hook(self.module, edit_output=_adder(delta, n, self.edit_positions)):
            logits = self.lm.model(input_ids=self.input_ids, use_cache=False).logits.float()
        log_probs = torch.log_softmax(logits, -1)
        return torch.stack([log_probs[row, self.offsets[row] + p] for row, p in self.rows.loss_entries()]).to(self.lm.device)


class CachedForward:
    """Prefixes once into a key/value cache, lower blocks once; each call runs the suffixes only."""

    def __init__(self, lm: LoadedModel, rows: ValueRows, layer: int, kind: str = "mlp"):
        self.lm, self.rows, self.layer, self.kind = lm, rows, layer, kind
        pad = _pad_id(lm)
        n, P = len(rows.prefixes), max(len(p) for p in rows.prefixes)
        S = max(len(s) for s in rows.suffixes)
        prefix_ids = [[pad] * (P - len(p)) + p for p in rows.prefixes]  # left-padded
        suffix_ids = [s + [pad] * (S - len(s)) for s in rows.suffixes]  # right-padded
        mask = [[0] * (P - len(p)) + [1] * len(p) + [1] * len(s) + [0] * (S - len(s))
                for p, s in zip(rows.prefixes, rows.suffixes)]
        self.mask = torch.tensor(mask, device=lm.device)
        positions = (self.mask.cumsum(1) - 1).clamp(min=0)
        self.suffix_ids = torch.tensor(suffix_ids, device=lm.device)
        self.suffix_positions = positions[:, P:]
        self.names = forward_kwargs(lm.model)
        self.cache = None
        if P:
            with torch.no_grad():
                out = lm.model(input_ids=torch.tensor(prefix_ids, device=lm.device), attention_mask=self.mask[:, :P],
                               position_ids=positions[:, :P], use_cache=True)
            self.cache = output_cache(out)
        entries = rows.loss_entries()
        self.entry_rows = torch.tensor([row for row, _ in entries], device=lm.device)
        self.entry_positions = torch.tensor([p for _, p in entries], device=lm.device)
        self.edit_positions = torch.zeros(n, dtype=torch.long, device=lm.device)
        self.below = None  # output of block layer-1 for the suffixes, captured on the first call

    def _kwargs(self) -> dict:
        kwargs = {"attention_mask": self.mask, "position_ids": self.suffix_positions, "use_cache": self.cache is not None}
        if self.cache is not None:
            kwargs[self.names["cache"]] = copy.deepcopy(self.cache)  # a forward appends to the cache
        return kwargs

    def _only_needed_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output embedding's input, cut to the loss entries: logits cost a vocabulary-wide
        product per position, and the loss reads one or two positions of each row."""
        return hidden[self.entry_rows.to(hidden.device), self.entry_positions.to(hidden.device)].unsqueeze(0)

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        blocks, n = self.lm.arch.blocks, self.suffix_ids.shape[0]
        hooks = [Hook(self.lm.arch.module(self.kind, self.layer), edit_output=_adder(delta, n, self.edit_positions)),
                 Hook(self.lm.model.get_output_embeddings(), edit_input=self._only_needed_logits)]
        capture = self.layer > 0 and self.below is None
        if capture:  # first call: run the lower blocks once and keep what block layer-1 returns
            captured = []
            handle = blocks[self.layer - 1].block.register_forward_hook(lambda m, a, out: captured.append(out))
        elif self.layer > 0:
            below = self.below
            hooks += [Hook(blocks[i].block, skip=lambda *a, **k: below) for i in range(self.layer)]
        try:
            with Hooks(hooks):
                logits = self.lm.model(input_ids=self.suffix_ids, **self._kwargs()).logits.float()
        finally:
            if capture:
                handle.remove()
        if capture:
            self.below = captured[0]
        return torch.log_softmax(logits[0].to(self.lm.device), -1)


def _adder(delta: torch.Tensor, n_rows: int, positions: torch.Tensor) -> Callable:
    rows = torch.arange(n_rows, device=positions.device)

    def add(output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        view = output.view(n_rows, -1, output.shape[-1]) if output.dim() == 2 else output  # OPT flattens
        # delta: (d,) or one row per batch row; it meets the module where the device map put it.
        view[rows.to(output.device), positions.to(output.device)] += delta.to(output.device, output.dtype)
        return output

    return add


@dataclass
class LossIndex:
    """Where the loss reads the log-probabilities, as flat index tensors, so that one gather serves
    every row (indexing row by row costs a full-size gradient buffer per row in the backward pass)."""

    entry: torch.Tensor  # one per (rewrite row, target token): where in the forward's log-probabilities
    token: torch.Tensor
    request: torch.Tensor
    weight: torch.Tensor  # 1 / (target length x rewrite rows): the NLL is a mean over both
    essence_entry: torch.Tensor  # per request, its essence row's entry


def loss_index(rows: ValueRows, n_requests: int, device) -> LossIndex:
    where = {entry: i for i, entry in enumerate(rows.loss_entries())}
    entries = []
    for r in range(n_requests):
        rewrite = rows.rewrite_rows(r)
        for row in rewrite:
            positions = rows.target_positions[row]
            entries += [(where[row, p], rows.targets[r][j], r, 1.0 / (len(positions) * len(rewrite)))
                        for j, p in enumerate(positions)]
    entry, token, request, weight = zip(*entries)
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return LossIndex(as_long(entry), as_long(token), as_long(request), torch.tensor(weight, device=device),
                     as_long([where[row, 0] for row in rows.essence_rows]))


def compute_value_deltas(lm: LoadedModel, layer: int, requests: list[EditRequest], templates: list[str], settings,
                         target_inits: torch.Tensor, *, forward: str = "cached", kind: str = "mlp",
                         row_scales: list[torch.Tensor] | None = None,
                         progress: Callable[[int], None] | None = None) -> list[ValueResult]:
    """Optimise one delta per request, all requests in one batch (settings: RomeSettings or
    MemitSettings). delta is added to the output of the MLP (`kind` "mlp", ROME) or of the whole
    block ("hidden", MEMIT's target z) at `layer`. Rows of different requests never interact and
    Adam works element-wise, so this equals optimising each request alone; a request that reaches
    the early-stop loss is frozen. Convergence is the criterion: each request runs until its loss
    (`settings.early_stop_on`, see EARLY_STOP_CRITERIA) is below `settings.early_stop_loss`, for at
    most `settings.v_steps` steps, and its result says whether it got there. `forward`: "cached"
    (fast) or "full" (the reference). `row_scales`: per request, one factor per prompt (its templates,
    then its essence prompt) that delta is multiplied by there (ROME's `value_through_update`);
    default 1 everywhere, as in the reference."""
    rows = value_rows(lm, requests, templates, settings.essence_prompt)
    runner = {"cached": CachedForward, "full": FullForward}[forward](lm, rows, layer, kind)
    n = len(requests)
    index = loss_index(rows, n, lm.device)
    # The value, its optimiser state and the loss stay in float32 in a half-precision model.
    target_inits = target_inits.to(lm.device, torch.float32)
    init_norms = target_inits.norm(dim=1)
    delta = torch.zeros_like(target_inits, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=settings.v_lr)
    row_request = torch.tensor(rows.row_request, device=lm.device)
    scales = (torch.cat([s.float() for s in row_scales]).to(lm.device)[:, None] if row_scales is not None
              else torch.ones(len(rows.row_request), 1, device=lm.device))
    if scales.shape[0] != len(rows.row_request):
        raise ValueError(f"row_scales: {scales.shape[0]} factors for {len(rows.row_request)} prompts")
    requires_grad = {p: p.requires_grad for p in lm.model.parameters()}
    for p in lm.model.parameters():
        p.requires_grad_(False)
    losses, nlls, steps = [[] for _ in range(n)], [[] for _ in range(n)], [0] * n
    active = torch.ones(n, dtype=torch.bool, device=lm.device)
    converged = torch.zeros(n, dtype=torch.bool, device=lm.device)
    leading_steps = torch.zeros(n, dtype=torch.long, device=lm.device)  # "top": steps with the target on top
    initial_essence = None
    try:
        for step in range(settings.v_steps):
            log_probs = runner(delta[row_request] * scales)
            picked = log_probs[index.entry, index.token]
            nll = torch.zeros(n, device=lm.device).index_add(0, index.request, -index.weight * picked)
            essence = log_probs[index.essence_entry]  # (n, vocab)
            if initial_essence is None:
                initial_essence = essence.detach().clone()
            kl = (essence.exp() * (essence - initial_essence)).sum(-1)  # KL(now || before), per request
            # The reference's weight decay: ||delta|| / ||v||^2.
            loss = nll + settings.kl_factor * kl + settings.v_weight_decay * delta.norm(dim=1) / init_norms ** 2
            for r, (value, fit) in enumerate(zip(loss.tolist(), nll.tolist())):
                if active[r]:
                    losses[r].append(value)
                    nlls[r].append(fit)
                    steps[r] = step + 1
            if settings.early_stop_on == "top":
                leading_steps += target_leads(log_probs.detach(), index, n)
                finished = leading_steps >= settings.early_stop_steps
            else:
                finished = (nll if settings.early_stop_on == "nll" else loss).detach() < settings.early_stop_loss
            converged |= active & finished
            active = active & ~finished if step < settings.v_steps - 1 else torch.zeros_like(active)
            if progress:
                progress(1)
            if not active.any():
                break
            frozen = ~active
            kept = delta.detach()[frozen].clone()
            optimizer.zero_grad()
            loss[active].sum().backward()
            optimizer.step()
            with torch.no_grad():
                delta[frozen] = kept  # Adam's momentum must not move a finished request
                max_norms = settings.clamp_norm_factor * init_norms
                norms = delta.norm(dim=1)
                scale = torch.where(norms > max_norms, max_norms / norms, torch.ones_like(norms))
                delta.mul_(scale.unsqueeze(1))
    finally:
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
    return [ValueResult(delta[r].detach(), target_inits[r].detach(), losses[r], steps[r], bool(converged[r]), nlls[r])
            for r in range(n)]


def target_leads(log_probs: torch.Tensor, index, n: int) -> torch.Tensor:
    """(n,) 1 where every target token of the request is the most likely token at its place on every
    one of its prompts, else 0 (MPES)."""
    picked = log_probs[index.entry, index.token]
    best = log_probs[index.entry].max(-1).values
    misses = torch.zeros(n, device=log_probs.device).index_add(0, index.request, (picked < best).float())
    return (misses == 0).long()


def compute_value_delta(lm: LoadedModel, layer: int, request: EditRequest, templates: list[str], settings,
                        target_init: torch.Tensor, *, forward: str = "cached", kind: str = "mlp",
                        row_scales: torch.Tensor | None = None,
                        progress: Callable[[int], None] | None = None) -> ValueResult:
    """One request's delta (see compute_value_deltas)."""
    return compute_value_deltas(lm, layer, [request], templates, settings, target_init.unsqueeze(0), forward=forward,
                                kind=kind, row_scales=None if row_scales is None else [row_scales],
                                progress=progress)[0]


def optimisation_summary(diagnostics: list[dict]) -> dict | None:
    """The first request's optimisation (steps, final target NLL, converged), or None where the
    method optimised no value (KN, fine-tuning): what the workbench shows beside a report."""
    if not diagnostics or "converged" not in diagnostics[0]:
        return None
    return {key: diagnostics[0][key] for key in ("steps", "final_nll", "converged")}


def optimisation_lines(diagnostics: list[dict], settings: ValueSettings) -> list[str]:
    """How the value optimisations ended, for people: one request in detail (saying loudly when it did
    not converge), a batch as a count with a warning for those that did not."""
    optimised = [d for d in diagnostics if "converged" in d]
    if not optimised:
        return []
    advice = "the edit may not hold (raise v_steps with a settings file)"
    criterion = {"nll": "target NLL", "total": "loss"}.get(settings.early_stop_on)
    reached = (f"{criterion} below {settings.early_stop_loss}" if criterion else
               f"the new object on top on every prompt at {settings.early_stop_steps} steps")
    if len(optimised) > 1:
        failed = sum(1 for d in optimised if not d["converged"])
        line = f"optimisation: {len(optimised) - failed} of {len(optimised)} values converged ({reached})"
        return [line] + ([f"warning: {failed} of {len(optimised)} value optimisations did not converge; "
                          + advice.replace("the edit may", "those edits may")] if failed else [])
    info = optimised[0]
    line = (f"optimisation: {info['steps']} steps, final loss {info['final_loss']:.4f} "
            f"(target NLL {info['final_nll']:.4f})")
    if info["converged"]:
        return [line + f", converged: {reached}"]
    return [line + f" -- NOT CONVERGED: not {reached} after the maximum of {settings.v_steps} steps; {advice}"]

