"""The workflows the command and the workbench share, in the library (issue 28, item 3): editing with a
report, adding a history batch with its report, exact-or-estimated tracing, and what a method says
about its edits (its registry entry, not the command line). On the tiny Llama."""

import numpy as np
import pytest
import torch
from test_alphaedit import FIRST, SECOND, settings_for

from factedit.edit import EditHistory, EditRequest, EditStack, edit, get_method
from factedit.edit.value import optimisation_lines, optimisation_summary
from factedit.errors import InputError
from factedit.report import checks_for, report_around
from factedit.settings import SettingsError
from factedit.trace import heatmaps, prepare, trace
from factedit.trace.atp import estimated_heatmaps
from factedit.trace.tracing import TRACING, estimating
from factedit.workflows import add_batch_with_report, edit_with_report

TEMPLATE, SUBJECT = "{} is located in the city of", "The Eiffel Tower"


def weights(lm):
    return {name: p.detach().clone() for name, p in lm.model.named_parameters()}


def test_edit_with_report_is_the_report_around_the_edit_and_leaves_it_applied(tiny_llama):
    lm, request = tiny_llama, EditRequest.create(TEMPLATE, SUBJECT, "Rome", "Paris")
    settings = get_method("ft").settings_with(lm, 1)
    before = weights(lm)

    def make_edit():
        delta, _ = edit(lm, request, "ft", settings)
        EditStack(lm).apply(delta)

    expected, _ = report_around(lm, request, checks_for(lm, request, ["The Eiffel Tower is in the city of"]),
                                make_edit)
    for name, p in lm.model.named_parameters():  # back to the unedited model
        p.data.copy_(before[name])

    applied = []
    made = edit_with_report(lm, request, "ft", settings, paraphrases=["The Eiffel Tower is in the city of"],
                            apply=lambda delta: applied.append(delta) or EditStack(lm).apply(delta) or "record")
    got, want = made.report.to_dict(), expected.to_dict()
    assert {k: v for k, v in got.items() if k != "rows"} == {k: v for k, v in want.items() if k != "rows"}
    for row, wanted in zip(got["rows"], want["rows"], strict=True):
        assert row == pytest.approx(wanted, abs=1e-6)
    assert [row.label for row in made.report.rows] == ["prompt", "paraphrase"] + ["prefixed (sampled)"] * 2
    assert made.report.rows[0].new_after > made.report.rows[0].new_before
    assert applied == [made.delta] and made.applied == "record"
    assert made.lines and made.lines[0].startswith("optimisation:")  # fine-tuning's own summary
    assert any(not torch.equal(p, before[n]) for n, p in lm.model.named_parameters())  # still applied


def test_edit_with_report_fills_in_the_current_target_and_a_failure_changes_nothing(tiny_llama):
    lm = tiny_llama
    before = weights(lm)
    with pytest.raises(SettingsError):
        bad = get_method("ft").settings_with(lm, 1)
        bad.layer = lm.n_layers  # a layer the model lacks: refused before any weight changes
        edit_with_report(lm, EditRequest.create(TEMPLATE, SUBJECT, "Rome"), "ft", bad)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    made = edit_with_report(lm, EditRequest.create(TEMPLATE, SUBJECT, "Rome"), "ft",
                            get_method("ft").settings_with(lm, 1))
    assert made.request.target_true and made.report.old == made.request.target_true
    assert made.delta.requests[0]["target_true"] == made.request.target_true


def test_a_history_batch_with_its_report(tiny_llama, word_corpus, tmp_path):
    lm = tiny_llama
    settings = settings_for(lm)
    history = EditHistory(lm, tmp_path / "history", lock=True)
    try:
        first = add_batch_with_report(history, FIRST, "alphaedit", settings)
        second = add_batch_with_report(history, SECOND, "alphaedit", settings)
    finally:
        history.release()
    assert (first.batch_number, second.batch_number) == (1, 2)
    assert first.saved.exists() and second.saved.exists() and first.saved != second.saved
    assert first.earlier == [] and [r.subject for r in second.earlier] == [r.subject for r in FIRST]
    # the report's "after" is the model now; the earlier edits' "before" is the model the first batch left
    np.testing.assert_allclose(second.earlier_before, first.new_after, atol=1e-6)
    assert sum(new > old for old, new in first.new_after) > sum(new > old for old, new in first.new_before)
    assert any(line.startswith("null space kept per layer") for line in first.lines)

    reloaded = EditHistory.load(tiny_llama, tmp_path / "history")  # the saved batches replay to the same model
    assert len(reloaded) == 2


def test_library_trace_estimates_with_approx_as_the_estimate_of_a_prepared_run(tiny_llama):
    lm, prompt = tiny_llama, "The Eiffel Tower is located in the city of"
    estimated = trace(lm, prompt, SUBJECT, "all", samples=3, seed=1, approx="atp")
    direct = estimated_heatmaps(prepare(lm, prompt, SUBJECT, samples=3, seed=1), ["hidden", "mlp", "attn"])
    for kind, result in estimated.items():
        assert result.approx == "atp"
        np.testing.assert_allclose(result.scores, direct[kind].scores, atol=1e-6)
    exact = trace(lm, prompt, SUBJECT, "mlp", samples=3, seed=1)
    assert exact["mlp"].approx == "" and not np.allclose(exact["mlp"].scores, estimated["mlp"].scores)

    refined = trace(lm, prompt, SUBJECT, "mlp", samples=3, seed=1, approx="atp", refine=4)
    rows = refined["mlp"].extra["refined"]
    assert len(rows) == 4 and all(r["exact"] == pytest.approx(exact["mlp"].scores[r["token"], r["layer"]], abs=1e-5)
                                  for r in rows)
    with pytest.raises(InputError, match="refining"):
        trace(lm, prompt, SUBJECT, "mlp", refine=4)
    with pytest.raises(InputError, match="hidden_no_mlp"):
        trace(lm, prompt, SUBJECT, "hidden_no_mlp", approx="atp")


def test_heatmaps_report_their_phase_with_its_total(tiny_llama):
    run = prepare(tiny_llama, "The Eiffel Tower is located in the city of", SUBJECT, samples=2)
    for approx, phase, total in ((None, TRACING, 2 * run.n_tokens * tiny_llama.n_layers),
                                 ("atp", estimating("atp"), 1)):
        heard = []

        def phases(name, total_steps, unit):
            heard.append([name, total_steps, 0])
            return lambda n: heard[-1].__setitem__(2, heard[-1][2] + n)

        heatmaps(run, ["hidden", "mlp"], approx=approx, progress=phases)
        assert heard == [[phase, total, total]]


def test_a_method_names_its_layers_and_its_report_lines(tiny_llama):
    lm = tiny_llama
    assert get_method("rome").edited_layers(get_method("rome").defaults(lm, 1)) == [1]
    memit = get_method("memit").defaults(lm)
    assert get_method("memit").edited_layers(memit) == memit.layers
    assert get_method("kn").edited_layers(get_method("kn").defaults(lm)) is None  # every layer
    assert get_method("kn").edited_layers(get_method("kn").defaults(lm, 1)) == [1]
    assert get_method("memit").edited_layers(memit.to_dict()) == memit.layers  # as an edit file saves them

    settings = get_method("rome").defaults(lm, 1)
    converged = {"steps": 7, "final_loss": 0.01, "final_nll": 0.01, "converged": True, "losses": [0.01]}
    failed = {**converged, "steps": settings.v_steps, "final_nll": 2.0, "converged": False}
    assert "converged: target NLL below" in optimisation_lines([converged], settings)[0]
    assert "NOT CONVERGED" in optimisation_lines([failed], settings)[0]
    batch = optimisation_lines([converged, failed, converged], settings)
    assert batch[0].startswith("optimisation: 2 of 3 values converged") and batch[1].startswith("warning: 1 of 3")
    assert optimisation_summary([failed]) == {"steps": settings.v_steps, "final_nll": 2.0, "converged": False}
    assert optimisation_summary([{"losses": [1.0], "steps": 1}]) is None  # fine-tuning optimises no value
    assert get_method("none").report_lines(None, [], None) == []
