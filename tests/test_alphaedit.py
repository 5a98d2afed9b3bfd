"""AlphaEdit and the editing history on a tiny model: the null-space projector, the preserved keys,
saving, reloading and reverting a history."""

import dataclasses

import pytest
import torch
from tiny import tiny_model, word_tokenizer

from factedit.edit import EditHistory, EditRequest, HistoryError, get_method
from factedit.edit.alphaedit import PROTECTED_TOKENS, alphaedit_solve, null_space_projector, protection, projectors
from factedit.errors import InputError
from factedit.hooks import Hook
from factedit.models import from_model
from factedit.stats import collect_second_moment, corpus_from

FIRST = [EditRequest.create("{} is located in the city of", s, "Rome", "Paris")
         for s in ("The Eiffel Tower", "The Space Needle")]
SECOND = [EditRequest.create("{} is located in the city of", "Michael Jordan", "Seattle", "Paris")]


@pytest.fixture()
def lm(word_corpus):
    return from_model(tiny_model("llama"), word_tokenizer(), name="tiny")


def settings_for(lm, **overrides):
    # Random tiny weights are hard to move: more, larger optimisation steps than on real models.
    values = {"stats_tokens": 2000, "v_steps": 60, "v_lr": 2.0, "clamp_norm_factor": 10, **overrides}
    return get_method("alphaedit").defaults(lm, 1, **values)


def corpus_keys(lm, layer, corpus_path):
    """Keys of the statistics' own text at `layer`: (n, d_mlp)."""
    text = corpus_path.read_text()[:2000]
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :60]
    with Hook(lm.arch.blocks[layer].mlp_out, keep_input=True) as hook, torch.no_grad():
        lm.model(input_ids=ids)
    return hook.input.reshape(-1, lm.arch.d_mlp)


def test_projector_keeps_the_smallest_directions_by_share_of_the_trace():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    eigenvalues = torch.tensor([1e-4, 1e-3, 0.1, 1.0, 2.0, 3.0], dtype=torch.float64)
    C = basis @ torch.diag(eigenvalues) @ basis.T
    found = null_space_projector(C, "trace_share", 0.001)  # 1.1e-3 of 6.1 fits, the 0.1 does not
    assert found.kept == 2 and found.null_energy == pytest.approx(1.1e-3)
    expected = basis[:, :2] @ basis[:, :2].T
    torch.testing.assert_close(found.matrix, expected, atol=1e-9, rtol=0)
    assert null_space_projector(C, "absolute", 0.5).kept == 3  # the reference's rule: eigenvalues below 0.5


def test_the_null_space_solve_equals_the_references_formula():
    torch.manual_seed(0)
    d, n = 12, 3
    C = torch.randn(d, 40, dtype=torch.float64)
    C = C @ C.T / 40
    projector = null_space_projector(C, "trace_share", 0.2)
    P = projector.matrix
    K, Kp = torch.randn(d, n, dtype=torch.float64), torch.randn(d, 5, dtype=torch.float64)
    H = Kp @ Kp.T
    A = P @ (K @ K.T + H) + 0.5 * torch.eye(d, dtype=torch.float64)
    reference = torch.linalg.solve(A, P @ K).T
    torch.testing.assert_close(alphaedit_solve(K, projector.basis, H, 0.5), reference, atol=1e-10, rtol=1e-8)


def test_the_projector_annihilates_the_preserved_keys(lm, word_corpus):
    """Keys of 20 tokens span 20 of the 48 directions: the other 28 are a true null space, and an
    update solved in it leaves those keys' outputs alone while writing the new keys' residuals."""
    from factedit.edit.prompts import io_at_subject

    preserved = corpus_keys(lm, 1, word_corpus)[:20].double().T  # (48, 20)
    projector = null_space_projector(preserved @ preserved.T / 20, "trace_share", 1e-9)
    assert projector.kept == lm.arch.d_mlp - 20
    K = torch.stack([io_at_subject(lm, "mlp", 1, r, ["{}"])[0][0] for r in FIRST], 1).double()
    torch.manual_seed(0)
    R = torch.randn(lm.arch.d_model, len(FIRST), dtype=torch.float64)
    change = R @ alphaedit_solve(K, projector.basis, torch.zeros(48, 48, dtype=torch.float64), 1e-6)
    W = lm.arch.blocks[1].mlp_out.weight.detach().double()
    assert float((change @ preserved).norm() / (W @ preserved).norm()) < 1e-3
    torch.testing.assert_close(change @ K, R, atol=1e-3 * float(R.norm()), rtol=0)


def test_a_second_batch_keeps_the_first_batchs_keys_and_revert_removes_them(lm):
    settings = settings_for(lm)
    history = EditHistory(lm)
    first, _ = history.edit(FIRST, "alphaedit", settings)
    name = next(iter(first.keys))
    assert history.preserved_keys(name).shape == (lm.arch.d_mlp, 2)
    H = history.key_moment(name, lm.arch.d_mlp)
    K = first.keys[name].double()
    torch.testing.assert_close(H, K @ K.T)
    history.edit(SECOND, "alphaedit", settings)
    assert history.preserved_keys(name).shape[1] == 3
    history.revert()
    assert history.preserved_keys(name).shape[1] == 2
    history.release()


def test_a_batch_of_another_method_before_alphaedit_is_reported_as_not_preserved(lm):
    values = {"stats_tokens": 2000, "v_steps": 10, "v_lr": 2.0, "clamp_norm_factor": 10}
    history = EditHistory(lm)
    history.edit(FIRST, "memit", get_method("memit").defaults(lm, 1, **values))  # records no keys
    after_memit, _ = history.edit(SECOND, "alphaedit", settings_for(lm, v_steps=10))
    assert after_memit.info["unpreserved_batches"] == 1 and after_memit.info["preserved_keys"] == 0
    after_alphaedit, _ = history.edit(FIRST[:1], "alphaedit", settings_for(lm, v_steps=10))
    assert after_alphaedit.info["unpreserved_batches"] == 1 and after_alphaedit.info["preserved_keys"] == 1
    history.release()


def test_a_saved_history_reloads_to_the_same_weights_and_goes_on_identically(lm, tmp_path):
    settings = settings_for(lm)
    original = {k: v.clone() for k, v in lm.model.state_dict().items()}
    uninterrupted = EditHistory(lm)
    uninterrupted.edit(FIRST, "alphaedit", settings)
    uninterrupted.edit(SECOND, "alphaedit", settings)
    expected = {k: v.clone() for k, v in lm.model.state_dict().items()}
    uninterrupted.release()
    assert all(torch.equal(original[k], v) for k, v in lm.model.state_dict().items())

    saved = EditHistory(lm, tmp_path / "history")
    saved.edit(FIRST, "alphaedit", settings)
    saved.release()  # a restart: the model is as loaded
    resumed = EditHistory.load(lm, tmp_path / "history")
    assert len(resumed) == 1
    resumed.edit(SECOND, "alphaedit", settings)  # H comes from the reloaded batch's keys
    assert all(torch.equal(expected[k], v) for k, v in lm.model.state_dict().items())
    resumed.revert()
    assert len(EditHistory.load(lm, tmp_path / "history")) == 1  # the folder follows the revert
    resumed.release()


def test_protected_facts_are_left_alone_by_a_later_batch(lm, tmp_path):
    """A protection batch changes no weight, is saved and reloaded with the history, and makes the next
    batch's update at the protected facts' keys a small fraction of what it is without it."""
    settings = settings_for(lm)
    kept = [EditRequest.create("{} is the capital of", city, country) for city, country in
            (("Berlin", "Germany"), ("Paris", "France"))]

    def change_at_protected_keys(protect: bool, weight: float = 1.0) -> float:
        history = EditHistory(lm, tmp_path / f"protect-{protect}-{weight}")
        shield = protection(lm, kept, settings)
        if protect:
            before = {k: v.clone() for k, v in lm.model.state_dict().items()}
            history.apply(shield)
            assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
            assert len(EditHistory.load(lm, history.folder)) == 1  # saved like any batch
        delta, _ = history.edit(FIRST, "alphaedit", dataclasses.replace(settings, preserve_weight=weight))
        history.release()

        def change_at(keys: dict) -> float:  # the largest relative change of the outputs at `keys` over the layers
            return max(float((delta.weight_change(name).double() @ K.double()).norm() /
                             (lm.model.get_submodule(name).weight.detach().double() @ K.double()).norm())
                       for name, K in keys.items())

        return change_at(shield.keys), change_at(delta.keys)

    unprotected, written = change_at_protected_keys(False)
    assert unprotected > 0.1  # without protection, this edit changes these facts' outputs a lot
    found = {w: change_at_protected_keys(True, w) for w in (1, 100)}
    shares = {w: protected / unprotected for w, (protected, _) in found.items()}
    # the reference's weight 1 protects only partly beside l2 (l2 / (l2 + w e)); a weight of 100 nearly fully
    assert shares[100] < 0.1 < shares[1] < 0.95, shares
    assert found[100][1] > 0.5 * written  # and the edit is still written
    with pytest.raises(InputError, match="no facts to protect"):
        protection(lm, [], settings)
    whole = protection(lm, kept, settings, tokens="prompt")  # every token of each prompt: 5 + 5 keys
    assert all(keys.shape == (lm.arch.d_mlp, 10) for keys in whole.keys.values())
    with pytest.raises(InputError, match="tokens must be one of subject, prompt"):
        protection(lm, kept, settings, tokens="all")


def test_protection_keys_equal_one_forward_per_layer(lm):
    """protection records every layer in one forward per fact; the reference runs one per layer."""
    from factedit.edit.prompts import io_at_subject
    from factedit.hooks import Hook

    settings = settings_for(lm)
    kept = [EditRequest.create("{} is the capital of", city, country) for city, country in
            (("Berlin", "Germany"), ("Paris", "France"))]
    for tokens in PROTECTED_TOKENS:
        found = protection(lm, kept, settings, tokens=tokens).keys
        for layer in settings.layers:
            reference = []
            for fact in kept:
                if tokens == "subject":
                    reference.append(io_at_subject(lm, "mlp", layer, fact, ["{}"])[0])
                else:
                    with Hook(lm.arch.module("mlp", layer), keep_input=True, stop=True) as hook:
                        lm.model(input_ids=torch.tensor([lm.tokenizer(fact.text)["input_ids"]]), use_cache=False)
                    reference.append(hook.input[0])
            assert torch.allclose(found[lm.arch.mlp_out_path(layer)], torch.cat(reference).T, atol=1e-6), (tokens, layer)


def test_a_history_of_another_model_or_other_layers_is_refused(lm, tmp_path):
    settings = settings_for(lm)
    history = EditHistory(lm, tmp_path / "h")
    history.edit(FIRST, "alphaedit", settings)
    with pytest.raises(InputError, match="continue a history with the layers it was made with"):
        history.edit(SECOND, "alphaedit", dataclasses.replace(settings, layers=[0, 1, 2]))
    history.release()
    other = from_model(tiny_model("llama", seed=1), word_tokenizer(), name="other")
    with pytest.raises(HistoryError, match="made for model tiny"):
        EditHistory.load(other, tmp_path / "h")


def test_too_few_keys_or_an_empty_null_space_say_what_to_change(lm):
    with pytest.raises(InputError, match=r"fewer than the 48 dimensions.*collect at least 480 tokens"):
        projectors(lm, settings_for(lm, stats_tokens=20))
    with pytest.raises(InputError, match="null space at layer 0 is empty.*raise null_space_threshold"):
        projectors(lm, settings_for(lm, null_space_threshold=1e-12))
    with pytest.raises(InputError, match="l2 must be positive"):
        EditHistory(lm).edit(FIRST, "alphaedit", settings_for(lm, l2=0.0))


def test_statistics_merge_feeds_the_projector(lm, word_corpus):
    """The projector is built from the same statistics MEMIT reads (one cache, not a second pass)."""
    stats = collect_second_moment(lm, 1, corpus_from(str(word_corpus)), 2000)
    settings = settings_for(lm)
    direct = null_space_projector(stats.matrix, settings.null_space_rule, settings.null_space_threshold)
    cached = projectors(lm, settings)[1]
    assert cached.kept == direct.kept and 0 < cached.kept < lm.arch.d_mlp
    torch.testing.assert_close(cached.matrix, direct.matrix, atol=1e-9, rtol=0)  # the same projector, not only its rank
