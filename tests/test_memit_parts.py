"""MEMIT's parts: residuals moved behind a post-MLP norm, targets cached on disk, and MEMIT on Gemma."""

import pytest
import torch
from tiny import tiny_model, word_tokenizer

from factedit.edit import EditRequest, EditStack, edit, get_method
from factedit.edit import memit as memit_module
from factedit.edit import targets as targets_module
from factedit.edit.mlp_change import BlockOfMlp, _jacobians, mlp_change
from factedit.hooks import Hook
from factedit.models import from_model
from factedit.scoring import target_probs

REQUESTS = [EditRequest.create("{} is located in the city of", s, "Rome", "Paris")
            for s in ("The Eiffel Tower", "The Space Needle")]


def tiny(family):
    return from_model(tiny_model(family), word_tokenizer(), name=f"tiny-{family}")


def block_output_with_added(lm, layer, change):
    """The slow reference: add `change` to the MLP projection's output at each subject token, run
    the whole model, read block `layer`'s output there."""
    f = BlockOfMlp(lm, layer, REQUESTS, "{}")
    rows, positions = f.rows, f.positions

    def add(output):
        output = output.clone()
        output[rows, positions] += change
        return output

    with Hook(lm.arch.module("mlp", layer), edit_output=add), \
            Hook(lm.arch.module("hidden", layer), keep_output=True) as block, torch.no_grad():
        lm.model(input_ids=f.batch.input_ids, use_cache=False)
    return block.output[rows, positions]


def test_residual_passes_through_where_the_mlp_output_is_added_as_is():
    lm = tiny("llama")
    residuals = torch.randn(2, lm.arch.d_model)
    found = mlp_change(lm, 1, REQUESTS, residuals, "{}")
    assert found.passthrough and torch.equal(found.change, residuals)
    moved = block_output_with_added(lm, 1, found.change) - block_output_with_added(lm, 1, torch.zeros_like(residuals))
    torch.testing.assert_close(moved, residuals, atol=1e-4, rtol=1e-4)


def test_residual_is_moved_behind_a_post_mlp_norm():
    lm = tiny("gemma3")
    torch.manual_seed(0)
    unchanged = block_output_with_added(lm, 1, torch.zeros(2, lm.arch.d_model))
    # A change the block can make by construction: what some MLP-output change produces.
    residuals = block_output_with_added(lm, 1, 0.3 * torch.randn(2, lm.arch.d_model)) - unchanged
    found = mlp_change(lm, 1, REQUESTS, residuals, "{}", iterations=20)
    assert not found.passthrough  # the norm rescales: adding r itself would not move the output by r
    assert (found.reached > 0.99).all(), found.reached
    moved = block_output_with_added(lm, 1, found.change) - unchanged
    torch.testing.assert_close(moved, residuals, atol=0.02 * residuals.norm().item(), rtol=0)


def test_jacobians_by_subject_position_equal_the_whole_padded_batch():
    """_jacobians reads each row only up to its subject, in groups of rows with the same subject
    position; the reference differentiates the whole right-padded batch, one output at a time."""
    lm = tiny("gemma3")
    requests = REQUESTS + [EditRequest.create("{} is located in the city of", "Paris", "Rome", "Paris"),
                           EditRequest.create("The city of {} is in", "Berlin", "Rome", "Germany")]
    f = BlockOfMlp(lm, 1, requests, "{}")
    assert len(set(f.batch.subject_last)) == 3
    with torch.no_grad():
        m0, y0 = f()
    y, J = _jacobians(f, m0, f.rows)
    torch.testing.assert_close(y, y0)
    rows, positions = f.rows, f.positions
    for row in range(len(requests)):
        def block_output(m_row):  # the whole padded batch, only this row's subject replaced
            def replace(output):
                output = output.clone()
                output[row, positions[row]] = m_row
                return output

            with Hook(lm.arch.module("mlp", 1), edit_output=replace), \
                    Hook(lm.arch.module("hidden", 1), keep_output=True, detach=False) as block:
                lm.model(input_ids=f.batch.input_ids, use_cache=False)
            return block.output[row, positions[row]]

        reference = torch.autograd.functional.jacobian(block_output, m0[row])
        torch.testing.assert_close(J[row], reference, atol=1e-5, rtol=1e-4)
    assert rows.tolist() == list(range(len(requests)))


def test_mlp_change_solves_each_row_on_its_own():
    """A batch gives what each request gives alone: rows stop on their own, whatever their company."""
    lm = tiny("gemma3")
    requests = REQUESTS + [EditRequest.create("{} is located in the city of", "Paris", "Rome", "Paris")]
    f = BlockOfMlp(lm, 1, requests, "{}")
    torch.manual_seed(1)
    with torch.no_grad():  # changes the block can make: what some MLP-output changes produce
        m0, y0 = f()
        residuals = f(m0 + 0.3 * torch.randn(m0.shape))[1] - y0
    together = mlp_change(lm, 1, requests, residuals, "{}")
    assert not together.passthrough and (together.reached > 0.99).all(), together.reached
    for row, request in enumerate(requests):
        alone = mlp_change(lm, 1, [request], residuals[row:row + 1], "{}")
        torch.testing.assert_close(together.change[row], alone.change[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(together.reached[row], alone.reached[0], atol=1e-5, rtol=1e-4)


def test_targets_are_reused_from_disk_until_the_weights_change(tmp_path, monkeypatch):
    lm = tiny("llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The Eiffel Tower is located in the city of Paris . " * 300)
    settings = memit_module.MemitSettings.defaults_for(lm, 1, stats_corpus=str(corpus), stats_tokens=1000,
                                                       v_steps=5, mom2_update_weight=1.0)
    first, _ = memit_module.memit_delta(lm, REQUESTS, settings, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("memit_targets/*/*.pt"))) == 2

    def no_optimising(*args, **kwargs):
        raise AssertionError("the targets should have come from the cache")

    monkeypatch.setattr(targets_module, "compute_value_deltas", no_optimising)
    again, _ = memit_module.memit_delta(lm, REQUESTS, settings, cache_dir=tmp_path)
    for name, change in first.changes.items():
        assert torch.equal(change["up"], again.changes[name]["up"])
    EditStack(lm).apply(first)  # other weights: the cached targets no longer apply
    with pytest.raises(AssertionError, match="from the cache"):
        memit_module.memit_delta(lm, REQUESTS, settings, cache_dir=tmp_path)


@pytest.mark.slow
def test_memit_writes_facts_into_gemma3(gemma3, data_dir, tmp_path):
    """Gemma's post-feed-forward norm sits between the MLP and the residual stream; MEMIT still
    makes the new object win (it did not before residuals were moved behind the norm)."""
    from factedit.data import load_counterfact

    lm = gemma3
    records = load_counterfact(data_dir / "counterfact" / "counterfact_dev.json", 2)
    requests = [r.request for r in records]
    settings = get_method("memit").settings_with(lm, stats_corpus=str(data_dir / "wiki" / "enwiki_sample.jsonl"),
                                                 stats_tokens=10_000)  # 5 x d_mlp keys: C well conditioned
    before = target_probs(lm, [r.text for r in requests], [r.target_new for r in requests])
    delta, info = edit(lm, requests, "memit", settings, cache_dir=tmp_path)
    stack = EditStack(lm)
    stack.apply(delta)
    try:
        new = target_probs(lm, [r.text for r in requests], [r.target_new for r in requests])
        true = target_probs(lm, [r.text for r in requests], [r.target_true for r in requests])
    finally:
        stack.revert()
    assert all(n > 0.5 and n > t and n > b for n, t, b in zip(new, true, before)), (before, new, true)
    assert all(min(i["mlp_reached"].values()) > 0 for i in info)
