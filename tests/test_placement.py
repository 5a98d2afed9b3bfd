"""Models split by a device map (accelerate, part of the blocks offloaded to disk) and models in half
precision: tracing, statistics and edits give the unsplit model's numbers; the half-precision probe
of the clamp rule gives float32's (ROME in bfloat16 on SmolLM2: tests/test_rome_smollm2.py)."""

import pytest
import torch
from tiny import tiny_model, word_tokenizer

from factedit import load
from factedit.edit import EditRequest, EditStack, edit, get_method
from factedit.edit.mlp_change import block_response
from factedit.placement import is_offloaded, read_weight
from factedit.scoring import target_probs
from factedit.stats import corpus_from, second_moment
from factedit.trace import trace

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
REQUEST = EditRequest.create("{} is located in the city of", SUBJECT, "Rome", "Paris")


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory):
    """A tiny Gemma 3 (a norm follows its MLP: the edits move their values behind it) as a folder."""
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    tiny_model("gemma3").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def split_map(lm_whole) -> dict:
    """Embedding and block 0 on the CPU, the other blocks offloaded to disk (weights on "meta",
    loaded for each forward pass by accelerate's hooks)."""
    names = [name for name, _ in lm_whole.model.named_children()]
    assert names == ["model", "lm_head"]
    inner = dict(lm_whole.model.model.named_children())
    device_map = {f"model.{name}": "cpu" for name in inner if name != "layers"}
    device_map.update({f"model.layers.{i}": "cpu" if i == 0 else "disk" for i in range(lm_whole.n_layers)})
    device_map["lm_head"] = "cpu"
    return device_map


def test_a_split_model_traces_collects_and_edits_like_the_whole_one(gemma_folder, word_corpus, tmp_path):
    whole = load(str(gemma_folder))
    split = load(str(gemma_folder), device_map=split_map(whole), cache_dir=tmp_path / "offload-cache")
    layer = 1
    edited_module = split.arch.blocks[layer].mlp_out
    assert is_offloaded(edited_module)  # the test covers the offloaded case
    assert split.fingerprint == whole.fingerprint

    a, b = trace(whole, PROMPT, SUBJECT, "mlp", samples=2), trace(split, PROMPT, SUBJECT, "mlp", samples=2)
    for kind in a:
        assert torch.allclose(torch.tensor(a[kind].scores), torch.tensor(b[kind].scores), atol=1e-6), kind

    corpus = corpus_from(str(word_corpus))
    c_whole = second_moment(whole, layer, corpus, 1024, cache_dir=tmp_path / "c1")[0].matrix
    c_split = second_moment(split, layer, corpus, 1024, cache_dir=tmp_path / "c2")[0].matrix
    assert torch.allclose(c_whole, c_split, rtol=1e-5, atol=1e-7)

    for method in ("rome", "memit", "ft"):
        overrides = {"layers": [layer], "v_steps": 10} if method == "memit" else \
            {"steps": 10} if method == "ft" else {"v_steps": 10}  # equal numbers, not convergence, are tested
        settings = get_method(method).settings_with(whole, layer if method != "memit" else None,
                                                    stats_corpus=str(word_corpus), **overrides)
        before = read_weight(edited_module).clone()
        stacks = []
        for lm in (whole, split):
            delta, _ = edit(lm, [REQUEST], method, settings)
            stack = EditStack(lm)
            stack.apply(delta)
            stacks.append((lm, stack, delta))
        (lm_a, stack_a, delta_a), (lm_b, stack_b, delta_b) = stacks
        for name in delta_a.changes:
            assert torch.allclose(delta_a.weight_change(name), delta_b.weight_change(name), atol=1e-5), method
        p_a, p_b = (target_probs(lm, [REQUEST.text], [" Rome"])[0] for lm in (lm_a, lm_b))
        assert abs(p_a - p_b) < 1e-5, method
        assert not torch.equal(read_weight(edited_module), before)  # the offloaded weight was written
        stack_a.revert_all()
        stack_b.revert_all()
        assert torch.equal(read_weight(edited_module), before), method  # and restored bit-exactly


def test_block_response_in_bfloat16_matches_float32(gemma_folder):
    """The clamp rule's probe: a finite difference would be lost in bfloat16's rounding."""
    full = load(str(gemma_folder))
    half = load(str(gemma_folder), dtype="bfloat16")
    factors = [0.5, 1.0, 2.0]
    for x, y in zip(block_response(full, 1, factors), block_response(half, 1, factors)):
        assert abs(x - y) < 0.03
