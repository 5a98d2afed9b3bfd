"""`factedit history edit | show | revert` and `--history` of generate/export on the tiny model: batches
made by the command one at a time give the weights of one uninterrupted library history."""

import json

import pytest
import torch
from click.testing import CliRunner
from test_alphaedit import FIRST, SECOND, settings_for

from factedit.cli import main
from factedit.edit import EditHistory
from factedit.models import load


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture()
def files(tiny_folder, word_corpus, tmp_path):
    """The requests of two batches and the AlphaEdit settings the tiny model needs, as files."""
    lm = load(str(tiny_folder))
    settings = tmp_path / "settings.json"
    settings_for(lm).save(settings)
    paths = {}
    for name, batch in (("first", FIRST), ("second", SECOND)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps([r.to_dict() for r in batch]))
    return lm, settings, paths


def test_batches_from_the_command_line_equal_one_library_history(files, tiny_folder, tmp_path):
    lm, settings, requests = files
    folder = tmp_path / "history"
    first = run("history", "edit", folder, "--model", tiny_folder, "-r", requests["first"], "--settings", settings)
    assert first.exit_code == 0, first.output
    assert "0 batch(es) replayed" in first.output and "this batch:" in first.output
    assert "'The Eiffel Tower is located in the city of': 'Paris' -> 'Rome'" in first.output
    second = run("history", "edit", folder, "--model", tiny_folder, "-r", requests["second"], "--settings", settings)
    assert second.exit_code == 0, second.output
    assert "1 batch(es) replayed, 2 edit(s) to check" in second.output
    assert "earlier edits:" in second.output and "of 2 preferred their new object" in second.output

    exported = run("export", "--model", tiny_folder, "--history", folder, "-o", tmp_path / "edited")
    assert exported.exit_code == 0, exported.output
    history = EditHistory(lm)  # the same two batches, in one process
    history.edit(FIRST, "alphaedit", settings_for(lm))
    history.edit(SECOND, "alphaedit", settings_for(lm))
    expected, unedited = lm.model.state_dict(), load(str(tiny_folder)).model.state_dict()
    edited = load(str(tmp_path / "edited")).model.state_dict()
    assert any(not torch.equal(expected[k], unedited[k]) for k in expected), "the history changed no weight"
    for key in expected:
        torch.testing.assert_close(edited[key], expected[key], rtol=0, atol=1e-6)

    shown = run("history", "show", folder)
    assert shown.exit_code == 0, shown.output
    assert "2 batch(es)" in shown.output and "alphaedit  1 edit(s), 3 in all" in shown.output
    reverted = run("history", "revert", folder)
    assert reverted.exit_code == 0 and "1 batch(es) left" in reverted.output
    assert "1 batch(es)" in run("history", "show", folder).output
    history.revert()  # the folder now replays to the library history without its second batch
    generated = run("generate", "--model", tiny_folder, "--history", folder, "-p", "The Space Needle is", "--max-new", 1)
    assert "replayed the history" in generated.output and "1 batch(es)" in generated.output
    replayed = EditHistory.load(load(str(tiny_folder)), folder)
    assert all(torch.equal(a, b) for a, b in zip(replayed.lm.model.state_dict().values(),
                                                  lm.model.state_dict().values()))


def test_bad_requests_and_histories_are_one_line_errors(files, tiny_folder, tmp_path):
    _, settings, requests = files
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([FIRST[0].to_dict(), {"prompt": "{} is in", "subject": "Rome"}]))
    # the file is read before the model loads: a model that does not exist is never reached
    result = run("history", "edit", tmp_path / "h", "--model", tmp_path / "no-model", "-r", bad)
    assert result.exit_code == 2
    assert "request 1" in result.output and "'target_new'" in result.output and "Traceback" not in result.output
    result = run("history", "revert", tmp_path / "h")
    assert result.exit_code == 2 and "not a history folder" in result.output
    result = run("history", "edit", tmp_path / "h", "--model", tiny_folder, "-r", requests["first"], "--settings",
                 settings)
    assert result.exit_code == 0, result.output
    result = run("history", "revert", tmp_path / "h", "--last", 2)
    assert result.exit_code == 2 and "holds 1 batch(es); cannot remove the last 2" in result.output
    result = run("export", "--model", tiny_folder, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "nothing to export" in result.output


def test_protecting_the_facts_the_model_answers(files, tiny_folder, tmp_path):
    """`history protect` keeps the keys of the facts the model answers (here: its own greedy answers,
    and one it gets wrong), and a later AlphaEdit batch preserves them."""
    from factedit.generate import greedy_continuation

    lm, settings, requests = files
    prompts = {"The Space Needle": "The Space Needle is located in the city of",
               "Michael Jordan": "Michael Jordan plays"}
    facts = [{"known_id": i, "subject": s, "prompt": p, "attribute": greedy_continuation(lm, p, 1).strip()}
             for i, (s, p) in enumerate(prompts.items())]
    facts.append({"known_id": 2, "subject": "France", "prompt": "The capital of France is",
                  "attribute": "Berlin"})  # not the tiny model's answer
    path = tmp_path / "known.json"
    path.write_text(json.dumps(facts))
    folder = tmp_path / "history"
    protected = run("history", "protect", folder, "--model", tiny_folder, "--facts", path, "--settings", settings)
    assert protected.exit_code == 0, protected.output
    assert "protected 2 of 3 facts" in protected.output
    assert "protects 2 fact(s)" in run("history", "show", folder).output
    edited = run("history", "edit", folder, "--model", tiny_folder, "-r", requests["second"], "--settings", settings)
    assert edited.exit_code == 0 and "0 edit(s) to check" in edited.output  # protected facts are not edits
    assert "protected facts: 2 of 2 answered before this batch" in edited.output
    history = EditHistory.load(load(str(tiny_folder)), folder)
    module = next(iter(history.batches[-1].keys))
    assert history.preserved_keys(module).shape[1] == 3  # the 2 protected facts and the edit's own key
    assert history.batches[-1].info["preserved_keys"] == 2
    history.release()
