"""The guard on lifelong editing (issue 29, item 4): a batch that costs more than its limits is refused,
leaving the weights and the history folder exactly as they were; limits that cannot be measured are
clear errors. On the tiny Llama."""

import json

import pytest
import torch
from click.testing import CliRunner
from test_alphaedit import FIRST, SECOND

from factedit.cli import main
from factedit.data.known import KnownFact
from factedit.edit import EditHistory, get_method
from factedit.errors import InputError
from factedit.evaluate.guard import Guard, GuardLimits, GuardRefused
from factedit.evaluate.lifelong import answered
from factedit.models import load
from factedit.stats import held_out_corpus


def settings_for(lm):
    # A strong MEMIT batch for the tiny model (its keys are few and large: lambda 1).
    return get_method("memit").defaults(lm, 1, stats_tokens=2000, v_steps=20, v_lr=2.0, clamp_norm_factor=10,
                                        mom2_update_weight=1.0)


def answered_facts(lm) -> list[KnownFact]:
    """Facts the tiny model answers: its own next words after a few prompts."""
    facts = []
    for subject in ("Michael Jordan", "France", "Germany", "Seattle", "Berlin", "Space Needle"):
        for template in ("{} is located in the city of", "The capital of {} is", "{} plays"):
            prompt = template.format(subject)
            word = lm.tokenizer.decode([int(lm.model(**lm.tokenizer(prompt, return_tensors="pt")).logits[0, -1].argmax())])
            if word.strip().isalpha():
                facts.append(KnownFact(len(facts), subject, word.strip(), prompt))
    return [f for f, ok in zip(facts, answered(lm, facts)) if ok]


def folder_state(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix != ".lock"}


def test_limits_are_read_from_the_command_line_form():
    assert GuardLimits.parse(["perplexity=1.05", "known=0.98"]) == GuardLimits(perplexity=1.05, known=0.98)
    for specs, message in [(["speed=2"], "NAME one of perplexity"), (["perplexity"], "NAME=NUMBER"),
                           (["known=most"], "'most' is not a number"), (["known=0.9", "known=0.8"], "given twice"),
                           (["perplexity=0.9"], "at least 1"), (["known=1.5"], r"in \(0, 1\]")]:
        with pytest.raises(InputError, match=message):
            GuardLimits.parse(specs)
    with pytest.raises(InputError, match="needs a limit"):
        GuardLimits()


def test_a_batch_over_the_limits_is_refused_and_changes_nothing(tiny_folder, word_corpus, tmp_path, monkeypatch):
    from factedit.evaluate import guard as guard_module

    lm = load(str(tiny_folder))
    settings = settings_for(lm)
    text = held_out_corpus(str(word_corpus))
    measured = guard_module.perplexity
    with EditHistory(lm, tmp_path / "history", lock=True) as history:
        history.edit(FIRST, "memit", settings)
        weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
        saved = folder_state(tmp_path / "history")
        # the batch as it is, measured as if it doubled perplexity: 10 before, 20 with the batch applied
        readings = iter([10.0, 20.0])
        monkeypatch.setattr(guard_module, "perplexity", lambda *args: next(readings))
        strict = Guard(lm, GuardLimits(perplexity=1.05), held_out=text)
        with pytest.raises(GuardRefused, match=r"the guard refused the batch of 1 edit\(s\): perplexity x2\.000 "
                                               r"\(10\.00 -> 20\.00\), limit x1\.05; the model and the history are as"):
            strict.edit(history, SECOND, "memit", settings)
        assert all(torch.equal(weights[k], v) for k, v in lm.model.state_dict().items())
        assert folder_state(tmp_path / "history") == saved and len(history) == 1
        monkeypatch.setattr(guard_module, "perplexity", measured)
        loose = Guard(lm, GuardLimits(perplexity=1000.0), held_out=text)
        delta, _, cost = loose.edit(history, SECOND, "memit", settings)
        assert len(history) == 2 and cost.perplexity_ratio == pytest.approx(
            guard_module.perplexity(lm, text, 2048) / cost.perplexity_before)
        assert delta.info["guard"]["perplexity_ratio"] == pytest.approx(cost.perplexity_ratio)
    reloaded = EditHistory.load(load(str(tiny_folder)), tmp_path / "history")
    assert reloaded.batches[-1].info["guard"]["perplexity_ratio"] == pytest.approx(cost.perplexity_ratio)


def test_known_facts_kept_are_measured_without_the_facts_the_batch_edits(tiny_llama):
    lm = tiny_llama
    facts = answered_facts(lm)
    assert len(facts) >= 3
    guard = Guard(lm, GuardLimits(known=0.01), known=facts)
    history = EditHistory(lm)
    _, _, cost = guard.edit(history, FIRST, "memit", settings_for(lm))
    edited = {r.subject for r in FIRST}
    assert cost.known_before == sum(f.subject not in edited for f in facts)
    assert 0 <= cost.known_still <= cost.known_before


def test_limits_that_cannot_be_measured_are_refused(tiny_llama):
    lm = tiny_llama
    with pytest.raises(InputError, match="needs held-out text"):
        Guard(lm, GuardLimits(perplexity=1.05))
    with pytest.raises(InputError, match="needs known facts"):
        Guard(lm, GuardLimits(known=0.9), known=[])
    right = answered_facts(lm)[0]
    other = next(f.attribute for f in answered_facts(lm) if f.attribute != right.attribute)
    wrong = [KnownFact(0, right.subject, other, right.prompt)]  # another fact's answer
    assert not any(answered(lm, wrong))
    with pytest.raises(InputError, match="answers none of the 1 given"):
        Guard(lm, GuardLimits(known=0.9), known=wrong)


def test_history_edit_with_a_guard_from_the_command_line(tiny_folder, word_corpus, tmp_path, monkeypatch):
    from factedit.evaluate import guard as guard_module

    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([r.to_dict() for r in SECOND]))
    settings = tmp_path / "settings.json"
    settings_for(load(str(tiny_folder))).save(settings)
    folder = tmp_path / "history"
    args = ["history", "edit", str(folder), "--model", str(tiny_folder), "-r", str(requests), "--method", "memit",
            "--settings", str(settings), "--corpus", str(word_corpus)]
    measured, readings = guard_module.perplexity, iter([10.0, 20.0])
    monkeypatch.setattr(guard_module, "perplexity", lambda *args: next(readings))  # as if the batch doubled it
    refused = CliRunner().invoke(main, args + ["--guard", "perplexity=1.05"])
    assert refused.exit_code == 2 and "error: the guard refused the batch" in refused.output, refused.output
    assert "perplexity x2.000 (10.00 -> 20.00)" in refused.output and not list(folder.glob("batch_*"))
    monkeypatch.setattr(guard_module, "perplexity", measured)
    kept = CliRunner().invoke(main, args + ["--guard", "perplexity=1000"])
    assert kept.exit_code == 0 and "guard: the batch cost perplexity x" in kept.output, kept.output
    assert len(list(folder.glob("batch_*"))) == 1
    bad = CliRunner().invoke(main, args + ["--guard", "speed=3"])
    assert bad.exit_code == 2 and "NAME one of perplexity" in bad.output
