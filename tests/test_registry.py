"""Every registered editing method honours the one contract on a tiny model."""


import pytest
import torch
from tiny import tiny_model, word_tokenizer

from factedit.edit.kn import last_token_activations
from factedit.edit import METHODS, EditRequest, EditStack, edit, get_method
from factedit.models import from_model
from factedit.scoring import target_probs


@pytest.fixture()
def setup(word_corpus):
    lm = from_model(tiny_model("llama"), word_tokenizer(), name="tiny")
    return lm, EditRequest.create("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_contract(setup, name):
    lm, request = setup
    method = get_method(name)
    # Random tiny weights are hard to move: more, larger optimisation steps than on real models.
    overrides = ({"stats_tokens": 2000, "v_steps": 60, "v_lr": 2.0, "clamp_norm_factor": 10}
                 if name.startswith("rome") or name in ("memit", "alphaedit", "encore") else {"lr": 1e-2} if name.startswith("ft")
                 else {})
    if name in ("memit", "encore"):
        overrides["mom2_update_weight"] = 1.0  # the tiny model's keys are few and large

    settings = method.defaults(lm, 1, **overrides) if name != "none" else method.defaults(lm)
    assert isinstance(settings, method.settings_type)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    p_before = target_probs(lm, [request.text], [request.target_new])[0]
    delta, info = edit(lm, request, name, settings)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert delta.method == name and len(info) == 1 and delta.requests[0]["subject"] == "The Eiffel Tower"
    stack = EditStack(lm)
    stack.apply(delta)
    p_after = target_probs(lm, [request.text], [request.target_new])[0]
    stack.revert()
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    if name == "none":
        assert p_after == p_before and not delta.changes
    elif name == "ft-l":
        change = delta.weight_change(next(iter(delta.changes)))
        assert float(change.abs().max()) <= info[0]["linf_bound"] * 1.01
    elif name == "kn":  # the rewrite touches exactly the selected neurons' value vectors
        neurons = info[0]["neurons"]
        assert neurons
        change = delta.weight_change(next(iter(delta.changes)))
        touched = sorted(change.abs().sum(0).nonzero().squeeze(1).tolist())
        assert touched == sorted(n for _, n in neurons)
        embed = lm.arch.embed.weight
        new, old = (lm.tokenizer(t, add_special_tokens=False).input_ids[0] for t in (" Rome", " Paris"))
        ids = lm.tokenizer(request.text, return_tensors="pt").input_ids
        activation = last_token_activations(lm, ids, 1)[0]
        for neuron in touched:  # 2 (e_new - e_old) / the neuron's activation at the prompt (scale-aware)
            assert torch.allclose(change[:, neuron] * activation[neuron], 2 * (embed[new] - embed[old]), atol=1e-5)
        plain = edit(lm, request, name, method.settings_with(lm, 1, preset="paper"))[0]
        assert torch.allclose(plain.weight_change(next(iter(plain.changes)))[:, touched[0]],
                              2 * (embed[new] - embed[old]), atol=1e-6)  # the reference rule
    elif name == "ft":
        assert p_after > 0.2 > p_before
    else:  # a tiny random model resists a one-layer edit; SmolLM2 tests check real behaviour
        assert p_after > 3 * p_before, (name, p_before, p_after)


def test_settings_round_trip_and_mismatch(setup, tmp_path):
    lm, request = setup
    settings = get_method("rome").defaults(lm, 1)
    settings.save(tmp_path / "s.json")
    assert type(settings).load(tmp_path / "s.json") == settings
    with pytest.raises(ValueError, match="key_mode"):
        edit(lm, request, "rome-original", settings)
    with pytest.raises(ValueError, match="takes FinetuneSettings"):
        edit(lm, request, "ft", settings)
    with pytest.raises(ValueError, match="unknown method"):
        edit(lm, request, "magic")
    (tmp_path / "bad.json").write_text('{"layer": 1, "colour": "red"}')
    with pytest.raises(ValueError, match="unknown RomeSettings fields: colour"):
        type(settings).load(tmp_path / "bad.json")


def test_memit_edits_many_facts_at_once_with_one_factor_per_request(setup):
    lm, _ = setup
    requests = [EditRequest.create("{} is located in the city of", s, "Rome", "Paris")
                for s in ("The Eiffel Tower", "The Space Needle", "Michael Jordan")]
    settings = get_method("memit").defaults(lm, 1, stats_tokens=2000, v_steps=60, v_lr=2.0, clamp_norm_factor=10,
                                            mom2_update_weight=1.0)
    assert settings.layers == [0, 1]
    before = target_probs(lm, [r.text for r in requests], [" Rome"] * 3)
    delta, info = edit(lm, requests, "memit", settings)
    assert len(info) == 3 and len(delta.changes) == 2 and len(delta.requests) == 3
    for change in delta.changes.values():
        assert change["up"].shape == (lm.arch.d_model, 3) and change["down"].shape == (3, lm.arch.d_mlp)
    stack = EditStack(lm)
    stack.apply(delta)
    after = target_probs(lm, [r.text for r in requests], [" Rome"] * 3)
    assert all(a > 2 * b for a, b in zip(after, before)), (before, after)


def test_integrated_gradients_are_complete(setup):
    """IG attributions add up to p(activation) - p(zero activation) (up to the Riemann sum)."""
    from factedit.edit.kn import neuron_attributions
    from factedit.hooks import Hook

    lm, request = setup
    target = lm.tokenizer(" Paris", add_special_tokens=False).input_ids[0]
    attributions = neuron_attributions(lm, request.text, target, 1, steps=400)
    ids = lm.tokenizer(request.text, return_tensors="pt").input_ids

    def p(edit=None):
        with Hook(lm.arch.blocks[1].mlp_out, edit_input=edit), torch.no_grad():
            return torch.softmax(lm.model(input_ids=ids).logits[0, -1], -1)[target].item()

    def zero_last(keys):
        keys = keys.clone()
        keys[:, -1] = 0
        return keys

    assert attributions.sum().item() == pytest.approx(p() - p(zero_last), abs=2e-3 * max(p(), 1e-3) + 1e-6)
