"""ENCORE (issue 29, item 2): its solve against a direct least-squares reference, most-probable early
stopping (MPES, early_stop_on="top") stopping exactly when the target leads on every prompt, and a
history on the tiny Llama whose second batch keeps the first's keys."""

import pytest
import torch
from test_alphaedit import FIRST, SECOND
from tiny import tiny_model, word_tokenizer

from factedit.edit import EditHistory, get_method
from factedit.edit import value as value_module
from factedit.edit.encore import encore_solve
from factedit.edit.value import LossIndex, compute_value_deltas, target_leads
from factedit.models import from_model
from factedit.settings import SettingsError


@pytest.fixture()
def lm(word_corpus):
    return from_model(tiny_model("llama"), word_tokenizer(), name="tiny")


def encore_settings(lm, **overrides):
    # Random tiny weights are hard to move: more, larger optimisation steps than on real models.
    values = {"stats_tokens": 2000, "v_steps": 60, "v_lr": 2.0, "clamp_norm_factor": 10, **overrides}
    return get_method("encore").defaults(lm, 1, **values)


def test_the_solve_is_the_least_squares_update_with_the_ridge_and_the_earlier_keys():
    """Delta W minimises ||Delta W K - R||^2 + lambda ||Delta W C^1/2||^2 + mu ||Delta W||^2 +
    ||Delta W K_p||^2: as one least-squares problem over the stacked columns [K, sqrt(lambda) C^1/2,
    sqrt(mu) I, K_p] with targets [R, 0, 0, 0]."""
    torch.manual_seed(0)
    d, d_out, n = 10, 7, 3
    samples = torch.randn(d, 50, dtype=torch.float64)
    C = samples @ samples.T / 50
    K, Kp = torch.randn(d, n, dtype=torch.float64), torch.randn(d, 4, dtype=torch.float64)
    R = torch.randn(d_out, n, dtype=torch.float64)
    lam, mu = 3.0, 0.7
    root = torch.linalg.cholesky(C)
    columns = torch.cat([K, lam ** 0.5 * root, mu ** 0.5 * torch.eye(d, dtype=torch.float64), Kp], 1)
    wanted = torch.cat([R, torch.zeros(d_out, columns.shape[1] - n, dtype=torch.float64)], 1)
    reference = torch.linalg.lstsq(columns.T, wanted.T).solution.T  # (d_out, d)
    update = R @ encore_solve(K, C, Kp @ Kp.T, lam, mu)
    torch.testing.assert_close(update, reference, atol=1e-10, rtol=1e-8)
    # mu bounds the update: a larger ridge, a smaller change
    assert (R @ encore_solve(K, C, Kp @ Kp.T, lam, 100 * mu)).norm() < update.norm()


def test_target_leads_is_the_top_token_at_every_target_place_of_the_request():
    log_probs = torch.log_softmax(torch.tensor([[0.0, 2.0, 1.0],    # request 0, entry 0: token 1 leads
                                                [3.0, 0.0, 1.0],    # request 0, entry 1: token 0 leads
                                                [0.0, 0.0, 5.0],    # request 1: token 2 leads
                                                [1.0, 1.0, 0.0]]), -1)  # (request 2: a tie counts as leading)
    index = LossIndex(entry=torch.tensor([0, 1, 2, 3]), token=torch.tensor([1, 0, 2, 1]),
                      request=torch.tensor([0, 0, 1, 2]), weight=torch.ones(4), essence_entry=torch.tensor([0]))
    assert target_leads(log_probs, index, 3).tolist() == [1, 1, 1]
    index = LossIndex(entry=torch.tensor([0, 1, 2, 3]), token=torch.tensor([1, 2, 2, 2]),
                      request=torch.tensor([0, 0, 1, 2]), weight=torch.ones(4), essence_entry=torch.tensor([0]))
    assert target_leads(log_probs, index, 3).tolist() == [0, 1, 0]


@pytest.mark.parametrize("steps_needed", [1, 3])
def test_mpes_stops_when_the_target_has_led_on_every_prompt_for_its_steps(lm, monkeypatch, steps_needed):
    heard = []  # per optimisation step, whether each request's target led

    def recording(log_probs, index, n):
        leads = target_leads(log_probs, index, n)
        heard.append(leads.tolist())
        return leads

    monkeypatch.setattr(value_module, "target_leads", recording)
    settings = encore_settings(lm, early_stop_steps=steps_needed, v_steps=80)
    layer, templates = 1, ["{}", "The {}"]
    inits = torch.zeros(len(FIRST), lm.arch.d_model)
    results = compute_value_deltas(lm, layer, FIRST, templates, settings, inits, kind="hidden")
    for r, result in enumerate(results):
        led = [step[r] for step in heard]
        assert result.converged
        # stopped at the step where the target had led for the `steps_needed`-th time, not before
        assert sum(led[:result.steps]) == steps_needed and led[result.steps - 1] == 1
    never = compute_value_deltas(lm, layer, FIRST, templates, encore_settings(lm, v_steps=1, v_lr=1e-9), inits,
                                 kind="hidden")
    assert not any(r.converged for r in never)  # the tiny model's targets do not lead at the start


def test_encore_keeps_the_first_batchs_keys(lm):
    from factedit.edit import edit

    settings = encore_settings(lm, early_stop_on="nll")
    history = EditHistory(lm)
    first, _ = history.edit(FIRST, "encore", settings)
    name = next(iter(first.keys))
    assert history.preserved_keys(name).shape == (lm.arch.d_mlp, 2)
    # The second batch's change, computed with the first batch's keys kept (H) and without: with H,
    # the first batch's keys' outputs move less.
    K = first.keys[name].double()
    kept, _ = edit(lm, SECOND, "encore", settings, history=history)
    forgotten, _ = edit(lm, SECOND, "encore", settings.__class__(**{**settings.to_dict(), "preserve_weight": 0.0}),
                        history=history)
    moved = {label: float((delta.weight_change(name).double() @ K).norm() / delta.weight_change(name).norm())
             for label, delta in (("kept", kept), ("forgotten", forgotten))}
    assert moved["kept"] < 0.8 * moved["forgotten"], moved  # (lambda C outweighs H: a modest effect)
    second, _ = history.edit(SECOND, "encore", settings)
    assert second.info["preserved_keys"] == 2 and history.preserved_keys(name).shape[1] == 3
    history.revert()
    assert history.preserved_keys(name).shape[1] == 2
    history.release()


def test_encore_refuses_a_history_kept_at_other_layers(lm):
    history = EditHistory(lm)
    history.edit(FIRST, "encore", encore_settings(lm, early_stop_on="nll", v_steps=5))
    with pytest.raises(Exception, match="continue a history with the layers it was made with"):
        history.edit(SECOND, "encore", encore_settings(lm, layers=[0], early_stop_on="nll", v_steps=5))
    history.release()
    with pytest.raises(SettingsError, match="early_stop_steps"):
        encore_settings(lm, early_stop_steps=0)


def test_every_layer_logs_the_change_asked_beside_the_mlp_output(lm):
    """The per-layer log of issue 29, item 1: ||x||, the change of the MLP projection's output a layer
    was asked for (the residual its update writes), beside ||m||, that output itself."""
    settings = encore_settings(lm, layers=[0, 1], early_stop_on="nll", v_steps=5)
    delta, _ = get_method("encore").compute(lm, FIRST, settings)
    norms = delta.info["layer_norms"]
    assert sorted(norms) == [0, 1]
    for layer, logged in norms.items():
        residual = delta.changes[lm.arch.mlp_out_path(layer)]["up"]  # (d_out, n): the columns asked for
        assert logged["asked"] == pytest.approx(float(residual.norm(dim=0).mean()), rel=1e-3)
        assert logged["mlp_output"] > 0 and logged["asked_share"] > 0
