"""ROME's parts on tiny models: requests, statistics, keys, value, solve, edit files."""

import numpy as np
import pytest
import torch
from tiny import tiny_model, word_tokenizer

from factedit.edit import EditDelta, EditFileError, EditRequest, EditStack, RomeSettings
from factedit.edit import rome
from factedit.edit.prompts import io_at_subject
from factedit.edit.rome import compute_keys, rome_delta, solve_rank_one, update_left, update_shares
from factedit.edit.value import CachedForward, compute_value_delta
from factedit.hooks import Hook
from factedit.models import from_model
from factedit.stats import Corpus, SecondMoment, collect_second_moment, corpus_from, second_moment, token_chunks
from factedit.tokens import PromptError

TEMPLATES = ["{}", "The city of Paris. {}", "Rome is a city. {}"]
TEXT = "The Eiffel Tower is located in the city of Paris . The Space Needle is in the city of Seattle . " * 20


def tiny(family="llama", seed=0):
    return from_model(tiny_model(family, seed), word_tokenizer(), name=f"tiny-{family}-{seed}")


def request():
    return EditRequest.create("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")


# ------------------------------------------------------------------------------------------ requests

def test_requests_are_validated_and_normalised():
    r = EditRequest.create("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome")
    assert r.prompt == "{} is located in the city of" and r.target_new == " Rome"
    assert r.text == "The Eiffel Tower is located in the city of"
    assert EditRequest.create("{} is in ", "X", "Rome").target_new == "Rome"  # prompt ends in a space
    for args, message in [(("{} is in", "", "Rome"), "subject is empty"),
                          (("", "X", "Rome"), "prompt is empty"),
                          (("Paris is nice", "X", "Rome"), "does not contain the subject"),
                          (("{} and {}", "X", "Rome"), "exactly once"),
                          (("{} is in", "X", " "), "new target is empty"),
                          (("{} is in", "X", "Rome", "Rome"), "equals the true target")]:
        with pytest.raises(PromptError, match=message):
            EditRequest.create(*args)


# ---------------------------------------------------------------------------------------- statistics

def test_second_moment_equals_direct_computation_and_merges(tmp_path):
    lm = tiny()
    text_file = tmp_path / "corpus.txt"
    text_file.write_text(TEXT)
    corpus = corpus_from(str(text_file))
    stats = collect_second_moment(lm, 1, corpus, 200, chunk_len=16, batch_size=3)
    # Direct: every chunk through the full model, keys recorded, k k^T averaged.
    keys = []
    for chunk in token_chunks(lm, corpus, 200, 16):
        with Hook(lm.arch.blocks[1].mlp_out, keep_input=True) as h, torch.no_grad():
            lm.model(input_ids=torch.tensor([chunk]))
        keys.append(h.input.reshape(-1, h.input.shape[-1]))
    k = torch.cat(keys).double()
    assert stats.count == k.shape[0] == 200
    assert torch.allclose(stats.matrix, k.T @ k / k.shape[0], rtol=1e-5, atol=1e-7)
    half_a, half_b = SecondMoment.empty(k.shape[1]), SecondMoment.empty(k.shape[1])
    half_a.add(k[:77]), half_b.add(k[77:])
    half_b.save(tmp_path / "b.safetensors")
    half_a.merge(SecondMoment.load(tmp_path / "b.safetensors"))
    assert half_a.count == 200 and torch.allclose(half_a.matrix, stats.matrix, rtol=1e-5, atol=1e-7)


def test_statistics_are_cached_by_model_layer_corpus_and_size(tmp_path):
    lm = tiny()
    text_file = tmp_path / "corpus.txt"
    text_file.write_text(TEXT)
    corpus = corpus_from(str(text_file))
    first, path, hit = second_moment(lm, 1, corpus, 100, cache_dir=tmp_path)
    assert not hit and path.exists() and "layer1_corpus-" in path.name and "100tok" in path.name
    again, path2, hit2 = second_moment(lm, 1, corpus, 100, cache_dir=tmp_path)
    assert hit2 and path2 == path and torch.equal(first.sum_outer, again.sum_outer)
    assert second_moment(lm, 2, corpus, 100, cache_dir=tmp_path)[1] != path
    assert second_moment(lm, 1, corpus, 50, cache_dir=tmp_path)[1] != path


def test_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        corpus_from(str(tmp_path / "nothing.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "x"}\n')
    with pytest.raises(ValueError, match="'text' field"):
        list(corpus_from(str(bad)).texts())
    with pytest.raises(ValueError, match="layer 7 out of range"):
        collect_second_moment(tiny(), 7, Corpus("x", lambda: iter(["a"]), "x"), 10)


# --------------------------------------------------------------------------------------------- keys

def test_keys_are_the_mlp_inputs_at_the_subjects_last_token():
    lm = tiny()
    keys = compute_keys(lm, 1, request(), TEMPLATES)
    ids = lm.tokenizer("The city of Paris. The Eiffel Tower is located in the city of", return_tensors="pt").input_ids
    with Hook(lm.arch.blocks[1].mlp_out, keep_input=True, keep_output=True) as h, torch.no_grad():
        lm.model(input_ids=ids)
    tower = lm.tokenizer.convert_ids_to_tokens(ids[0]).index("Tower")
    all_keys = [compute_keys(lm, 1, request(), [t]).k_plain for t in TEMPLATES]
    assert torch.allclose(all_keys[1], h.input[0, tower], atol=1e-5)
    assert torch.allclose(keys.k_avg, torch.stack(all_keys).mean(0), atol=1e-5)
    assert torch.allclose(keys.k_plain, all_keys[0], atol=1e-6)


# -------------------------------------------------------------------------------------------- value

@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3", "opt"])
def test_cached_value_optimisation_equals_the_full_forward_reference(family):
    lm = tiny(family)
    settings = RomeSettings.defaults_for(lm, 1, v_steps=6)
    keys = compute_keys(lm, 1, request(), TEMPLATES)
    fast = compute_value_delta(lm, 1, request(), TEMPLATES, settings, keys.v_avg, forward="cached")
    full = compute_value_delta(lm, 1, request(), TEMPLATES, settings, keys.v_avg, forward="full")
    assert fast.steps == full.steps and np.allclose(fast.losses, full.losses, rtol=1e-4)
    assert float((fast.delta - full.delta).norm()) <= 1e-4 * float(full.delta.norm()) + 1e-7


def test_value_optimisation_lowers_the_loss_and_respects_the_clamp():
    lm = tiny()
    settings = RomeSettings.defaults_for(lm, 1, v_steps=15, clamp_norm_factor=0.5)
    keys = compute_keys(lm, 1, request(), TEMPLATES)
    result = compute_value_delta(lm, 1, request(), TEMPLATES, settings, keys.v_avg)
    assert result.losses[-1] < result.losses[0]
    assert float(result.delta.norm()) <= 0.5 * float(keys.v_avg.norm()) * (1 + 1e-5)


# -------------------------------------------------------------------------------------------- solve

def test_rank_one_solve_matches_numpy():
    rng = np.random.default_rng(0)
    d_mlp, d = 12, 5
    A = rng.normal(size=(d_mlp, 40))
    C = A @ A.T / 40
    W = rng.normal(size=(d, d_mlp))
    k, k_other = rng.normal(size=d_mlp), rng.normal(size=d_mlp)
    v_target = rng.normal(size=d)
    left, right = solve_rank_one(torch.tensor(C), torch.tensor(k), torch.tensor(k), torch.tensor(W @ k),
                                 torch.tensor(v_target))
    expected = np.outer(v_target - W @ k, np.linalg.inv(C) @ k) / (k @ np.linalg.inv(C) @ k)
    delta = np.outer(right.numpy(), left.numpy())
    assert np.allclose(delta, expected, rtol=1e-4, atol=1e-6)
    assert np.allclose((W + delta) @ k, v_target, atol=1e-4)  # the new key maps to the new value
    # Reference variant: direction from one key, residual and denominator from another.
    left, right = solve_rank_one(torch.tensor(C), torch.tensor(k), torch.tensor(k_other), torch.tensor(W @ k_other),
                                 torch.tensor(v_target))
    assert np.allclose((W + np.outer(right, left)) @ k_other, v_target, atol=1e-4)
    ridge_left, _ = solve_rank_one(torch.tensor(C), torch.tensor(k), torch.tensor(k), torch.tensor(W @ k),
                                   torch.tensor(v_target), ridge=0.1)
    u = np.linalg.solve(C + 0.1 * np.diag(C).mean() * np.eye(d_mlp), k)
    assert np.allclose(ridge_left.numpy(), u / (u @ k), rtol=1e-4)


@pytest.mark.parametrize("key_mode", ["consistent", "original"])
def test_rome_writes_the_update_that_solve_rank_one_solves(key_mode, monkeypatch):
    """Step 4 as documented is what rome_delta runs: its factors are solve_rank_one's for the averaged
    key's direction, bit for bit the same as with the direction solved again (rome_delta passes the
    one its value step needed)."""
    lm = tiny()
    A = torch.randn(lm.arch.d_mlp, 200, generator=torch.Generator().manual_seed(0))
    C = A @ A.T / 200
    settings = RomeSettings.defaults_for(lm, 1, v_steps=3, key_mode=key_mode)
    calls = []
    monkeypatch.setattr(rome, "solve_rank_one", lambda *args, **kwargs: calls.append((args, kwargs))
                        or solve_rank_one(*args, **kwargs))
    delta, _ = rome_delta(lm, request(), settings, C, TEMPLATES)
    assert len(calls) == 1 and "left" in calls[0][1]
    args = calls[0][0]
    keys = compute_keys(lm, 1, request(), TEMPLATES)
    assert torch.equal(args[1], keys.k_avg) and args[5] == settings.ridge
    assert torch.equal(args[2], keys.k_avg if key_mode == "consistent" else keys.k_plain)
    left, right = solve_rank_one(*args)  # without the direction passed in: solved again
    change = next(iter(delta.changes.values()))
    assert torch.equal(change["down"][0], left) and torch.equal(change["up"][:, 0], right)


def test_value_step_optimises_what_the_rank_one_update_does_at_each_prompt(monkeypatch):
    """With value_through_update, each prompt's MLP output moves during the value step by exactly what
    the final update then adds there: share x delta, share = left^T k at the prompt's key."""
    lm = tiny()
    rng = torch.Generator().manual_seed(0)
    A = torch.randn(lm.arch.d_mlp, 200, generator=rng)
    C = A @ A.T / 200
    settings = RomeSettings.defaults_for(lm, 1, v_steps=3)
    keys = compute_keys(lm, 1, request(), TEMPLATES)
    shares = update_shares(lm, request(), settings, keys, update_left(C, keys.k_avg, keys.k_avg, settings.ridge))
    assert shares.shape == (len(TEMPLATES) + 1,) and not torch.allclose(shares, torch.ones_like(shares))
    assert float((shares[:-1]).mean()) == pytest.approx(1.0, abs=1e-4)  # the averaged key gets all of it
    seen = []  # what the value step adds at each prompt, step by step
    real_call = CachedForward.__call__
    monkeypatch.setattr(CachedForward, "__call__", lambda self, rows: seen.append(rows.detach().clone())
                        or real_call(self, rows))
    delta, info = rome_delta(lm, request(), settings, C, TEMPLATES)
    assert torch.allclose(seen[-1], shares[:, None] * seen[-1][0] / shares[0], atol=1e-5)
    name = next(iter(delta.changes))
    right = delta.changes[name]["up"][:, 0]
    before = io_at_subject(lm, "mlp", 1, request(), TEMPLATES)[1]
    stack = EditStack(lm)
    stack.apply(delta)
    try:
        after = io_at_subject(lm, "mlp", 1, request(), TEMPLATES)[1]
    finally:
        stack.revert()
    assert torch.allclose(after - before, shares[:-1, None] * right[None], atol=1e-4)
    assert float(delta.changes[name]["up"].norm()) == pytest.approx(info["delta_norm"], rel=1e-4)


# --------------------------------------------------------------------------------------- edit files

def tiny_delta(lm, layer=1):
    C = torch.eye(lm.arch.d_mlp)
    settings = RomeSettings.defaults_for(lm, layer, v_steps=4)
    return rome_delta(lm, request(), settings, C, TEMPLATES)[0]


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # GPT-2 stores the weight transposed (Conv1D)
def test_apply_changes_the_output_by_the_delta_and_revert_is_bit_exact(family):
    lm = tiny(family)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    delta = tiny_delta(lm)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items()), "computing must not edit"
    name = next(iter(delta.changes))
    module = lm.model.get_submodule(name)
    x = torch.randn(3, lm.arch.d_mlp)
    with torch.no_grad():
        y0 = module(x)
        stack = EditStack(lm)
        stack.apply(delta)
        y1 = module(x)
    assert torch.allclose(y1 - y0, x @ delta.weight_change(name).T, atol=1e-4)
    stack.revert()
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


def test_edit_stack_reverts_any_edit_exactly_and_composes():
    lm = tiny()
    base = {k: v.clone() for k, v in lm.model.state_dict().items()}
    a, b = tiny_delta(lm, 1), tiny_delta(lm, 2)
    stack = EditStack(lm)
    stack.apply(b)
    only_b = {k: v.clone() for k, v in lm.model.state_dict().items()}
    stack.revert()
    stack.apply(a), stack.apply(b)
    stack.revert(0)  # remove a, keep b
    assert all(torch.equal(only_b[k], v) for k, v in lm.model.state_dict().items())
    stack.revert_all()
    assert all(torch.equal(base[k], v) for k, v in lm.model.state_dict().items())
    both = a.compose(b)
    assert len(both.changes) == 2 and len(both.requests) == 2


def test_save_load_round_trip_and_refusals(tmp_path):
    lm = tiny()
    delta = tiny_delta(lm)
    path = delta.save(tmp_path / "edit.safetensors")
    loaded = EditDelta.load(path)
    assert loaded.method == "rome" and loaded.model_fingerprint == lm.fingerprint
    assert loaded.requests == delta.requests and loaded.settings["layer"] == 1
    name = next(iter(delta.changes))
    assert torch.equal(loaded.weight_change(name), delta.weight_change(name))
    assert b"pickle" not in path.read_bytes()[:200]
    other = tiny("llama", seed=1)
    with pytest.raises(EditFileError, match="made for the model with fingerprint"):
        EditStack(other).apply(loaded)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EditFileError, match="not a valid"):
        EditDelta.load(tmp_path / "junk.safetensors")
    with pytest.raises(EditFileError, match="not found"):
        EditDelta.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(EditFileError, match="not a factedit edit"):
        EditDelta.load(tmp_path / "plain.safetensors")


def test_failed_edit_leaves_the_model_unchanged(monkeypatch):
    from factedit.edit import value as value_module

    lm = tiny()
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    flags = [p.requires_grad for p in lm.model.parameters()]
    calls = []

    def explode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        return original(*args, **kwargs)

    original = value_module.CachedForward.__call__
    monkeypatch.setattr(value_module.CachedForward, "__call__", explode)
    with pytest.raises(RuntimeError, match="interrupted"):
        tiny_delta(lm)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert [p.requires_grad for p in lm.model.parameters()] == flags


def test_batched_value_optimisation_equals_one_request_at_a_time():
    from factedit.edit.value import compute_value_deltas

    lm = tiny()
    requests = [EditRequest.create("{} is located in the city of", s, t, "Paris")
                for s, t in (("The Eiffel Tower", "Rome"), ("The Space Needle", "Berlin"), ("Michael Jordan", "Seattle"))]
    settings = RomeSettings.defaults_for(lm, 1, v_steps=8, early_stop_loss=4.62)  # requests stop at 4, 1, 5 steps
    inits = torch.stack([compute_keys(lm, 1, r, TEMPLATES).v_avg for r in requests])
    together = compute_value_deltas(lm, 1, requests, TEMPLATES, settings, inits)
    for request, init, batched in zip(requests, inits, together):
        alone = compute_value_delta(lm, 1, request, TEMPLATES, settings, init)
        assert batched.steps == alone.steps and np.allclose(batched.losses, alone.losses, rtol=1e-4)
        assert torch.allclose(batched.delta, alone.delta, atol=1e-4 * float(alone.delta.norm()) + 1e-6)
    assert len({r.steps for r in together}) > 1, "the test should cover requests stopping at different steps"
