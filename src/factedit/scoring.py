"""Probabilities of continuations, batched: many (prompt, target) pairs in one forward pass."""

from __future__ import annotations

import torch

from .hooks import Hook
from .tokens import PromptError
from .models import LoadedModel


def prompt_target_batch(lm: LoadedModel, prompts: list[str], targets: list[str]
                        ) -> tuple[torch.Tensor, list[tuple[int, list[int]]]]:
    """Right-padded ids of prompt + target rows and, per row, (prompt length, target ids).
    With causal attention the padding never influences real positions."""
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets must have the same length")
    rows, spans = [], []
    for prompt, target in zip(prompts, targets):
        p_ids = list(lm.tokenizer(prompt)["input_ids"])
        t_ids = list(lm.tokenizer(target, add_special_tokens=False)["input_ids"])
        if not t_ids:
            raise PromptError(f"the target {target!r} tokenizes to nothing")
        rows.append(p_ids + t_ids)
        spans.append((len(p_ids), t_ids))
    width = max(len(r) for r in rows)
    pad = lm.tokenizer.pad_token_id or 0
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=lm.device), spans


def target_position_logits(lm: LoadedModel, ids: torch.Tensor, spans: list[tuple[int, list[int]]]) -> torch.Tensor:
    """Logits at the positions that predict each row's target tokens only, (rows, longest target,
    vocab): the unembedding's input is cut down to those positions by a hook, so a large vocabulary
    (Gemma's 262k) costs a few positions per row instead of the whole sequence. Whatever the model
    does after the unembedding (e.g. logit soft-capping) still applies."""
    longest = max(len(t_ids) for _, t_ids in spans)
    index = torch.tensor([[n - 1 + min(j, len(t_ids) - 1) for j in range(longest)] for n, t_ids in spans],
                         device=lm.device)
    rows = torch.arange(len(spans), device=lm.device)[:, None]
    with Hook(lm.arch.unembed, edit_input=lambda hidden: hidden[rows.to(hidden.device), index.to(hidden.device)]):
        return lm.model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def target_logprobs(lm: LoadedModel, prompts: list[str], targets: list[str], batch_size: int = 32) -> torch.Tensor:
    """Mean per-token log-probability of each target as a continuation of its prompt."""
    results = []
    for start in range(0, len(prompts), batch_size):
        ids, spans = prompt_target_batch(lm, prompts[start:start + batch_size], targets[start:start + batch_size])
        log_probs = torch.log_softmax(target_position_logits(lm, ids, spans).float(), -1).to(lm.device)
        for i, (_, t_ids) in enumerate(spans):
            picked = log_probs[i, torch.arange(len(t_ids), device=lm.device), torch.tensor(t_ids, device=lm.device)]
            results.append(picked.mean())
    return torch.stack(results).cpu()


def target_probs(lm: LoadedModel, prompts: list[str], targets: list[str]) -> list[float]:
    """P(target | prompt) as exp(mean token log-probability) (exact for single-token targets)."""
    return target_logprobs(lm, prompts, targets).exp().tolist()


@torch.no_grad()
def teacher_forced_predictions(lm: LoadedModel, prompts: list[str], targets: list[str]
                               ) -> list[tuple[list[int], list[int]]]:
    """For each (prompt, target): the model's argmax token at every target position given the prompt
    and the target's previous tokens, and the target's tokens (inputs of zsRE's token accuracy)."""
    ids, spans = prompt_target_batch(lm, prompts, targets)
    predicted = target_position_logits(lm, ids, spans).argmax(-1).tolist()
    return [(predicted[i][:len(t_ids)], t_ids) for i, (_, t_ids) in enumerate(spans)]
