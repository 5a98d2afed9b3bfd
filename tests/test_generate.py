import pytest
import torch
from tiny import FAMILIES, tiny_model, word_tokenizer

from factedit.generate import generate_batch, generate_ids
from factedit.models import from_model

PROMPTS = ["The Eiffel Tower is located in", "Paris", "The Space Needle is located in the city of"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_batched_generation_continues_each_prompt_as_alone(family):
    """Left padding, the mask and the shifted positions must not change any row's greedy continuation."""
    tokenizer = word_tokenizer()
    lm = from_model(tiny_model(family), tokenizer)
    prompts = [list(tokenizer(p)["input_ids"]) for p in PROMPTS]
    batch = generate_batch(lm, prompts, 6)
    for row, prompt in zip(batch, prompts):
        assert torch.equal(row, generate_ids(lm, prompt, 6)[0, len(prompt):])


def test_sampling_is_seeded_and_private(tiny_llama):
    prompts = [list(tiny_llama.tokenizer(p)["input_ids"]) for p in PROMPTS]
    state = torch.random.get_rng_state()
    a = generate_batch(tiny_llama, prompts, 8, top_k=5, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # torch's global generator untouched
    assert torch.equal(a, generate_batch(tiny_llama, prompts, 8, top_k=5, seed=3))
    assert not torch.equal(a, generate_batch(tiny_llama, prompts, 8, top_k=5, seed=4))


def test_empty_prompt_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="empty prompt"):
        generate_batch(tiny_llama, [[]], 3)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cache_is_read_without_deprecation_warnings(family, monkeypatch):
    """kv_cache asks each output for its cache by the name its class has: asking a transformers 5
    output for `past_key_values` logs a deprecation warning (seen in the Gemma trace logs)."""
    from transformers.utils import generic

    from factedit import kv_cache
    warned = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda message, *args: warned.append(message))
    model = tiny_model(family)
    ids = torch.tensor([[1, 2, 3, 4]])
    _, cache = kv_cache.forward(model, ids, use_cache=True)
    assert cache is not None
    logits, after = kv_cache.forward(model, ids[:, -1:], cache=cache)
    assert after is not None and logits.shape[1] == 1
    assert kv_cache.forward(model, ids)[1] is None
    assert warned == []
