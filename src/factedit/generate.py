"""Text generation with a private, seeded random generator (never torch's global state).

Used for greedy continuations in the CLI, ROME's sampled context prefixes, and the statistics
corpus fallback when no text is available.
"""

from __future__ import annotations

import torch

from .kv_cache import forward_kwargs, output_cache
from .models import LoadedModel
from .progress import Step
from .request import EditRequest
from .tokens import PromptError, check_prompt_length


def _encode(lm: LoadedModel, text: str) -> list[int]:
    ids = check_prompt_length(lm, text)
    if not ids:
        raise PromptError("cannot generate from an empty prompt")
    return ids


@torch.no_grad()
def generate_batch(lm: LoadedModel, prompts_ids: list[list[int]], n_new: int, *, top_k: int | None = None,
                   seed: int = 0, progress: Step | None = None) -> torch.Tensor:
    """Continue several prompts of any lengths at once by `n_new` tokens: greedy when top_k is None,
    otherwise top-k sampling from a torch.Generator seeded with `seed`. Prompts are left-padded and
    masked, with positions counted from each prompt's first real token, so every row continues as
    it would alone. `progress` receives the tokens generated at each step (one per prompt).
    Returns the (len(prompts_ids), n_new) new ids."""
    if not prompts_ids or any(len(ids) == 0 for ids in prompts_ids):
        raise PromptError("cannot generate from an empty prompt")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    names = forward_kwargs(lm.model)
    width = max(len(ids) for ids in prompts_ids)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    step_input = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in prompts_ids], device=lm.device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts_ids], device=lm.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = bool((mask == 0).any())
    cache, new_ids = None, []
    for _ in range(n_new):
        kwargs = {"use_cache": True}
        if names["position_ids"]:
            kwargs["position_ids"] = positions
        if padded:  # without padding the causal mask alone is right (and faster)
            kwargs["attention_mask"] = mask
        if cache is not None:
            kwargs[names["cache"]] = cache
        if names["logits_to_keep"]:
            kwargs[names["logits_to_keep"]] = 1
        result = lm.model(input_ids=step_input, **kwargs)
        cache = output_cache(result)
        logits = result.logits[:, -1].float().cpu()
        if top_k is None:
            next_ids = logits.argmax(-1, keepdim=True)
        else:
            values, indices = logits.topk(top_k, dim=-1)
            choice = torch.multinomial(torch.softmax(values, -1), 1, generator=generator)
            next_ids = indices.gather(-1, choice)
        new_ids.append(next_ids)
        step_input = next_ids.to(lm.device)
        mask = torch.cat([mask, torch.ones_like(step_input)], dim=1)
        positions = positions[:, -1:] + 1
        if progress:
            progress(len(prompts_ids))
    return torch.cat(new_ids, dim=1) if new_ids else torch.zeros((len(prompts_ids), 0), dtype=torch.long)


def generate_ids(lm: LoadedModel, prompt_ids: list[int], n_new: int, *, copies: int = 1, top_k: int | None = None,
                 seed: int = 0, progress: Step | None = None) -> torch.Tensor:
    """Continue `prompt_ids` by `n_new` tokens in `copies` rows (see generate_batch).
    Returns (copies, len + n_new) ids."""
    new = generate_batch(lm, [prompt_ids] * copies, n_new, top_k=top_k, seed=seed, progress=progress).to(lm.device)
    return torch.cat([torch.tensor([prompt_ids] * copies, device=lm.device), new], dim=1)


def greedy_continuation(lm: LoadedModel, prompt: str, n_new: int = 20) -> str:
    ids = _encode(lm, prompt)
    out = generate_ids(lm, ids, n_new)[0, len(ids):]
    return lm.tokenizer.decode(out, skip_special_tokens=True)


def with_current_target(lm: LoadedModel, request: EditRequest) -> EditRequest:
    """`request` with its current target (target_true) filled in where it has none: the model's
    greedy next token after the prompt, stripped. The one rule of the CLI's `edit` and the server.
    When that token is only whitespace (a line break, a space) or a special token (end of text), the
    model does not state a fact there and there is no current target to take: a PromptError asks for it."""
    if request.target_true is not None:
        return request
    top = greedy_continuation(lm, request.text, 1)
    if not top.strip():
        raise PromptError(f"the model's next token after {request.text!r} is {top!r} (whitespace or a special "
                          f"token), not an object to replace; give the current target (--true on the command line, "
                          f"target_true in the API), or end the prompt where the object follows")
    return EditRequest.create(request.prompt, request.subject, request.target_new, top.strip(),
                              occurrence=request.occurrence)


def _start_ids(lm: LoadedModel, start: str, context: str) -> tuple[list[int], list[int]]:
    """(what precedes the start word, the start word's ids) for sample_texts."""
    ids = list(lm.tokenizer(start, add_special_tokens=False)["input_ids"])
    bos = lm.tokenizer.bos_token_id
    if bos is not None and _encode(lm, start)[0] == bos:
        return [bos], ids
    return (list(lm.tokenizer(context, add_special_tokens=False)["input_ids"]) if context else []), ids


def sample_texts(lm: LoadedModel, starts: list[str], n_per_start: int, length: int, *, top_k: int = 5,
                 seed: int = 0, context: str = "", progress: Step | None = None) -> list[str]:
    """Short texts sampled from the model: `n_per_start` for each start word, `length` tokens each
    (counting the start), as the ROME reference sampled its context prefixes. `progress` receives the
    tokens generated, sampled_tokens(...) in all.

    The start word is preceded by the tokenizer's start-of-text token if it adds one, else by
    `context` (which the texts do not include). Without either the start word sits at position 0,
    which some models (SmolLM2) use as an attention sink: their prediction there ignores the word
    ("The", "I", "Because" all continue with "-" 40% of the time) and the samples degenerate
    ("The-199."); after a newline they are ordinary sentences."""
    texts = []
    for i, start in enumerate(starts):
        prefix, ids = _start_ids(lm, start, context)
        out = generate_ids(lm, prefix + ids, max(0, length - len(ids)), copies=n_per_start, top_k=top_k,
                           seed=seed * 1000 + i, progress=progress)
        texts += [lm.tokenizer.decode(row[len(prefix):], skip_special_tokens=True) for row in out]
    return texts


def sampled_tokens(lm: LoadedModel, starts: list[str], n_per_start: int, length: int, context: str = "") -> int:
    """How many tokens sample_texts generates for these arguments: the total of its progress."""
    return sum(n_per_start * max(0, length - len(_start_ids(lm, start, context)[1])) for start in starts)
