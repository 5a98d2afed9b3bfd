"""Convergence as the criterion of the value optimisation, named settings ("paper"), and what edits
report about their optimisation: in the result, the runner's case files and summary, and the CLI."""

import json

import pytest
from click.testing import CliRunner
from tiny import tiny_model, word_tokenizer

from factedit.cli import main
from factedit.edit import EditRequest, METHODS, RomeSettings, edit, get_method
from factedit.edit.rome import compute_keys
from factedit.edit.value import compute_value_delta
from factedit.evaluate.runner import markdown_table, run_evaluation
from factedit.models import from_model

TEMPLATES = ["{}", "The city of Berlin . {}"]


def tiny():
    return from_model(tiny_model("llama"), word_tokenizer(), name="tiny-llama")


def eiffel():
    return EditRequest.create("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")


def test_a_one_step_budget_is_reported_as_not_converged():
    lm = tiny()
    keys = compute_keys(lm, 1, eiffel(), TEMPLATES)
    short = compute_value_delta(lm, 1, eiffel(), TEMPLATES, RomeSettings.defaults_for(lm, 1, v_steps=1), keys.v_avg)
    assert short.steps == 1 and not short.converged
    assert short.diagnostics()["final_loss"] == short.losses[-1] > 0.05
    # Given room, it runs until the target's NLL is below the criterion and stops there (a criterion
    # this tiny random model reaches: its first NLL minus 0.5).
    criterion = short.nlls[0] - 0.5
    long = compute_value_delta(lm, 1, eiffel(), TEMPLATES, RomeSettings.defaults_for(
        lm, 1, v_steps=300, v_lr=2.0, clamp_norm_factor=10, early_stop_loss=criterion), keys.v_avg)
    assert long.converged and long.nlls[-1] < criterion and all(nll >= criterion for nll in long.nlls[:-1])
    assert long.losses[-1] > long.nlls[-1]  # the objective adds the KL and weight-decay terms
    # The reference's criterion, the whole objective, is met later or not at all.
    total = compute_value_delta(lm, 1, eiffel(), TEMPLATES, RomeSettings.defaults_for(
        lm, 1, v_steps=300, v_lr=2.0, clamp_norm_factor=10, early_stop_loss=criterion, early_stop_on="total"),
        keys.v_avg)
    assert total.steps > long.steps and total.nlls[:long.steps] == pytest.approx(long.nlls)
    with pytest.raises(ValueError, match="early_stop_on"):
        compute_value_delta(lm, 1, eiffel(), TEMPLATES, RomeSettings.defaults_for(lm, 1, early_stop_on="loss"),
                            keys.v_avg)
    assert long.steps == len(long.losses) < 300


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_editors_report_convergence_per_request(word_corpus, method):
    lm = tiny()
    settings = get_method(method).defaults(lm, 1, v_steps=1, stats_tokens=500)
    requests = [eiffel(), EditRequest.create("{} is located in the city of", "The Space Needle", "Berlin", "Seattle")]
    _, diagnostics = edit(lm, requests, method, settings)
    assert len(diagnostics) == 2
    assert all(d["steps"] == 1 and d["converged"] is False and d["final_loss"] > 0.05 for d in diagnostics)


def test_runner_stores_convergence_and_the_summary_counts_the_edits_that_did_not(word_corpus, tmp_path):
    from test_runner import counterfact_file

    lm = tiny()
    settings = get_method("rome").defaults(lm, 1, v_steps=1, stats_tokens=500)
    summary = run_evaluation(lm, "rome", "counterfact", tmp_path / "run", data=str(counterfact_file(tmp_path)), n=2,
                             settings=settings)
    case = json.loads((tmp_path / "run" / "cases" / "10.json").read_text())
    assert case["edit"]["converged"] is False and case["edit"]["steps"] == 1
    assert summary["not_converged"] == 2 and summary["edits_with_convergence"] == 2
    table = markdown_table([summary])
    assert "not conv." in table.splitlines()[0] and table.splitlines()[-1].endswith("| 2 of 2 |")


def test_named_settings_reach_the_reference_protocol():
    lm = tiny()
    assert get_method("rome").settings_with(lm).v_steps > 20
    paper = get_method("rome").settings_with(lm, preset="paper")
    assert paper.v_steps == 20 and paper.preset == "paper" and paper.key_mode == "consistent"
    assert paper.early_stop_on == "total" and paper.prefix_context == ""
    assert get_method("rome-original").settings_with(lm, preset="paper").key_mode == "original"
    memit = get_method("memit").settings_with(lm, preset="paper")
    assert memit.v_steps == 25 and memit.mom2_update_weight == 15000.0
    ft_l = get_method("ft-l").settings_with(lm, preset="paper")
    assert ft_l.linf_constraint == 5e-4 and not ft_l.linf_relative
    kn = get_method("kn").settings_with(lm, preset="paper")
    assert not kn.follow_activation_sign and not kn.per_unit_activation
    assert all("paper" in spec.preset_names() for name, spec in METHODS.items() if name != "none")
    with pytest.raises(ValueError, match="no settings named 'gpt2-xl'.*default, paper"):
        get_method("rome").settings_with(lm, preset="gpt2-xl")


def test_ft_l_bound_is_relative_to_the_weights_scale():
    lm = tiny()
    settings = get_method("ft-l").defaults(lm, 1, lr=1e-2)
    weight = lm.arch.blocks[1].mlp_out.weight
    rms = float(weight.detach().pow(2).mean().sqrt())
    delta, info = edit(lm, eiffel(), "ft-l", settings)
    change = next(iter(delta.changes.values()))["dense"]
    assert info[0]["linf_bound"] == pytest.approx(settings.linf_constraint * rms)
    assert float(change.abs().max()) <= info[0]["linf_bound"] * (1 + 1e-5)
    paper = get_method("ft-l").settings_with(lm, 1, preset="paper", lr=1e-2)
    assert edit(lm, eiffel(), "ft-l", paper)[1][0]["linf_bound"] == 5e-4


def test_cli_says_when_an_edit_did_not_converge_and_takes_settings_by_name(tmp_path, word_corpus):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    settings_file = tmp_path / "one-step.json"
    RomeSettings.defaults_for(tiny(), 1, v_steps=1, stats_tokens=500).save(settings_file)
    base = ["edit", "--model", str(folder), "--prompt", "{} is located in the city of", "--subject",
            "The Eiffel Tower", "--target", "Rome", "--true", "Paris"]
    result = CliRunner().invoke(main, base + ["--settings", str(settings_file)])
    assert result.exit_code == 0, result.output
    assert "optimisation: 1 steps" in result.output and "NOT CONVERGED" in result.output
    result = CliRunner().invoke(main, base + ["--settings", "paper", "--layer", "1", "--tokens", "500"])
    assert result.exit_code == 0, result.output
    assert "optimisation:" in result.output
    result = CliRunner().invoke(main, base + ["--settings", "gpt2-xl"])
    assert result.exit_code == 2 and "neither a settings file nor a name" in result.output
