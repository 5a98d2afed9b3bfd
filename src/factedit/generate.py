"""Text generation with a private, seeded random generator (never torch's global state).

Used for greedy continuations in the CLI, ROME's sampled context prefixes, and the statistics
corpus fallback when no text is available.
"""

from __future__ import annotations

import torch

from .models import LoadedModel
from .trace.runs import forward_kwargs


def _encode(lm: LoadedModel, text: str) -> list[int]:
    ids = list(lm.tokenizer(text)["input_ids"])
    if not ids:
        raise ValueError("cannot generate from an empty prompt")
    return ids


@torch.no_grad()
def generate_ids(lm: LoadedModel, prompt_ids: list[int], n_new: int, *, copies: int = 1, top_k: int | None = None,
                 seed: int = 0) -> torch.Tensor:
    """Continue `prompt_ids` by `n_new` tokens in `copies` rows: greedy when top_k is None, otherwise
    top-k sampling from a torch.Generator seeded with `seed`. Returns (copies, len + n_new) ids."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    names = forward_kwargs(lm.model)
    ids = torch.tensor([prompt_ids] * copies, device=lm.device)
    out, cache, step_input = ids, None, ids
    for _ in range(n_new):
        kwargs = {"use_cache": True}
        if cache is not None:
            kwargs[names["cache"]] = cache
        if names["logits_to_keep"]:
            kwargs[names["logits_to_keep"]] = 1
        result = lm.model(input_ids=step_input, **kwargs)
        cache = result.get("cache") if "cache" in result else result.get("past_key_values")
        logits = result.logits[:, -1].float().cpu()
        if top_k is None:
            next_ids = logits.argmax(-1, keepdim=True)
        else:
            values, indices = logits.topk(top_k, dim=-1)
            choice = torch.multinomial(torch.softmax(values, -1), 1, generator=generator)
            next_ids = indices.gather(-1, choice)
        step_input = next_ids.to(lm.device)
        out = torch.cat([out, step_input], dim=1)
    return out


def greedy_continuation(lm: LoadedModel, prompt: str, n_new: int = 20) -> str:
    ids = _encode(lm, prompt)
    out = generate_ids(lm, ids, n_new)[0, len(ids):]
    return lm.tokenizer.decode(out, skip_special_tokens=True)


def sample_texts(lm: LoadedModel, starts: list[str], n_per_start: int, length: int, *, top_k: int = 5,
                 seed: int = 0) -> list[str]:
    """Short texts sampled from the model: `n_per_start` for each start word, `length` tokens each
    (counting the start), as the ROME reference sampled its context prefixes."""
    texts = []
    for i, start in enumerate(starts):
        ids = list(lm.tokenizer(start, add_special_tokens=False)["input_ids"])
        bos = lm.tokenizer.bos_token_id
        prefix = [bos] if bos is not None and _encode(lm, start)[0] == bos else []
        out = generate_ids(lm, prefix + ids, max(0, length - len(ids)), copies=n_per_start, top_k=top_k,
                           seed=seed * 1000 + i)
        texts += [lm.tokenizer.decode(row[len(prefix):], skip_special_tokens=True) for row in out]
    return texts
