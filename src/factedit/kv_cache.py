"""Everything factedit knows about transformers' forward arguments and key/value cache, which change
across versions (`past_key_values` became `cache`; `Cache.crop` took the length to keep, now the
number of tokens to drop; `num_logits_to_keep` became `logits_to_keep`). Callers pass and receive a
cache as an opaque object: `forward` runs a model with or without one, `prefix` cuts a copy of one to
its first tokens, `keep_rows` narrows one layer of it to some batch rows.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect

import torch


def forward_kwargs(model) -> dict[str, str]:
    """Names of optional forward arguments this model understands ("" where it has none)."""
    params = inspect.signature(model.forward).parameters
    return {
        "cache": "cache" if "cache" in params else "past_key_values",
        "logits_to_keep": "logits_to_keep" if "logits_to_keep" in params else "",
        "position_ids": "position_ids" if "position_ids" in params else "",
    }


def output_cache(output):
    """The key/value cache a forward returned (None without use_cache). The field's name is read off
    the output class: asking a new output for the old name logs a deprecation warning."""
    names = {field.name for field in dataclasses.fields(output)}
    return getattr(output, "cache" if "cache" in names else "past_key_values", None)


def forward(model, input_ids: torch.Tensor, *, cache=None, use_cache: bool = False, last_only: bool = False,
            **kwargs) -> tuple[torch.Tensor, object]:
    """Run `model` on `input_ids` after `cache` (None: from the start), keeping its cache when
    `use_cache`; `last_only`: logits at the last position only where the model can skip the others.
    Other keyword arguments (attention_mask, position_ids) go to the model as they are.
    Returns (logits, the cache or None)."""
    names = forward_kwargs(model)
    if last_only and names["logits_to_keep"]:
        kwargs[names["logits_to_keep"]] = 1
    if cache is not None:
        kwargs[names["cache"]] = cache
        use_cache = True
    out = model(input_ids=input_ids, use_cache=use_cache, **kwargs)
    return out.logits, output_cache(out)


def prefix(cache, length: int, n_tokens: int, repeats: int = 1):
    """A copy of `cache` (which holds `n_tokens` tokens) cut to its first `length` tokens, each batch
    row repeated `repeats` times; None where the cache cannot be cut (a sliding-window layer already
    past its window), and the caller then runs the whole input."""
    if length == 0 or cache is None:
        return None
    cut = copy.deepcopy(cache)
    try:
        if "tokens_to_remove" in inspect.signature(cut.crop).parameters:  # transformers 5: tokens to drop
            cut.crop(length - n_tokens)
        else:
            cut.crop(length)
    except (RuntimeError, ValueError, NotImplementedError):
        return None
    cut.batch_repeat_interleave(repeats)
    return cut


def keep_rows(cache, layer: int, rows: torch.Tensor) -> None:
    """Narrow layer `layer` of `cache` to batch `rows`, in place: for a block that computes only those
    rows (each block reads and extends only its own layer of the cache)."""
    entry = cache.layers[layer]
    entry.keys, entry.values = entry.keys[rows], entry.values[rows]
