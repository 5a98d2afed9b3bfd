import json

import numpy as np
import pytest
from tiny import tiny_model, word_tokenizer

from factedit.data.known import DatasetError, KnownFact, load_known_facts
from factedit.models import from_model
from factedit.stats_running import RunningMean
from factedit.trace import average as average_module
from factedit.trace.average import average_effects, token_class_rows
from factedit.trace.heatmap import heatmap
from factedit.trace.runs import prepare


def test_token_classes_follow_the_paper():
    scores = np.arange(8)[:, None] * np.ones((1, 2))  # row i holds i
    rows = token_class_rows(scores, (1, 5))  # subject = tokens 1..4, then 5, 6, last 7
    assert {k: v[0] for k, v in rows.items()} == {"first_subject": 1, "middle_subject": 2.5, "last_subject": 4,
                                                   "first_after": 5, "further": 6, "last": 7}
    rows = token_class_rows(scores[:4], (0, 2))  # two-token subject, one token after it, then the last
    assert set(rows) == {"first_subject", "last_subject", "first_after", "last"}


def test_running_mean_merges_like_numpy():
    data = np.random.default_rng(0).normal(size=(50, 3))
    a, b = RunningMean(), RunningMean()
    for row in data[:20]:
        a.add(row)
    for row in data[20:]:
        b.add(row)
    a.merge(RunningMean.from_state(json.loads(json.dumps(b.state()))))
    assert a.count == 50
    assert np.allclose(a.mean, data.mean(0)) and np.allclose(a.std, data.std(0, ddof=1))


def test_site_is_the_run_of_layers_near_the_peak():
    result = average_module.AverageResult(average_module.AverageSettings(kinds=["mlp"]))
    curve = np.array([0.069, 0.073, 0.081, 0.087, 0.091, 0.090, 0.035, 0.085])  # a late bump is not the site
    result.effects["mlp"] = {"last_subject": RunningMean()}
    result.effects["mlp"]["last_subject"].add(curve)
    assert result.peak("mlp", "last_subject") == (4, pytest.approx(0.091))
    assert result.site("mlp", "last_subject") == [3, 4, 5]  # >= 0.9 x 0.091 = 0.0819
    assert result.site("mlp", "last_subject", share=0.75) == [0, 1, 2, 3, 4, 5]


def tiny_facts(lm):
    prompt = "Michael Jordan plays basketball professionally in the city of"
    answer = prepare(lm, prompt, "Michael Jordan", samples=1).answer.strip()
    wrong = "Rome" if answer != "Rome" else "Paris"
    return [KnownFact(0, "Michael Jordan", answer, prompt), KnownFact(1, "Michael Jordan", wrong, prompt)]


def test_average_skips_wrong_facts_matches_heatmaps_and_resumes(tmp_path, monkeypatch):
    lm = from_model(tiny_model("llama"), word_tokenizer(), name="tiny-llama")
    facts = tiny_facts(lm)
    result = average_effects(lm, facts, "hidden", samples=2, noise=1.0, out_dir=tmp_path)
    assert (result.n_facts, result.n_correct, result.n_skipped) == (2, 1, 1)
    run = prepare(lm, facts[0].prompt, facts[0].subject, samples=2, noise=1.0)
    expected = heatmap(run, "hidden").indirect_effects
    assert np.allclose(result.effects["hidden"]["last"].mean, expected[-1], atol=1e-5)
    assert np.allclose(result.effects["hidden"]["first_subject"].mean, expected[0], atol=1e-5)

    def must_not_run(*args, **kwargs):
        raise AssertionError("finished facts must not be traced again")

    monkeypatch.setattr(average_module, "fact_record", must_not_run)
    again = average_effects(lm, facts, "hidden", samples=2, noise=1.0, out_dir=tmp_path)
    assert again.to_dict() == result.to_dict()
    # a run written before the corruption, metric and approx settings existed resumes as gaussian/prob/exact
    settings = json.loads((tmp_path / "settings.json").read_text())
    (tmp_path / "settings.json").write_text(json.dumps({k: v for k, v in settings.items()
                                                        if k not in ("corruption", "metric", "approx")}))
    assert average_effects(lm, facts, "hidden", samples=2, noise=1.0, out_dir=tmp_path).to_dict() == result.to_dict()
    with pytest.raises(ValueError, match=r"other settings \(samples: 2 -> 3\)"):
        average_effects(lm, facts, "hidden", samples=3, noise=1.0, out_dir=tmp_path)
    assert len(json.loads((tmp_path / "settings.json").read_text())["sessions"]) == 3  # the first run and the two resumed
    with pytest.raises(ValueError, match="other settings"):
        average_effects(lm, facts, "hidden", samples=2, noise=1.0, metric="logit-diff", out_dir=tmp_path)

    from factedit.folder_lock import FolderBusyError, FolderLock
    from factedit.run_folder import LOCK_FILE

    with FolderLock(tmp_path, LOCK_FILE, "run folder"):  # another run in the folder: refused
        with pytest.raises(FolderBusyError, match="in use by another process"):
            average_effects(lm, facts, "hidden", samples=2, noise=1.0, out_dir=tmp_path)
    assert len(json.loads((tmp_path / "settings.json").read_text())["sessions"]) == 3


def test_average_of_replaced_subjects_and_estimates(tmp_path):
    """corrupt="replace" draws other subjects of the same facts; a fact whose subject nothing can
    replace is counted apart, not traced; approx="atp" averages estimates and says so."""
    lm = from_model(tiny_model("llama"), word_tokenizer(), name="tiny-llama")
    prompts = {s: f"{s} is located in the city of" for s in ("Michael Jordan", "Space Needle", "Eiffel Tower",
                                                             "The Eiffel Tower")}
    # every fact answered as the model answers it; the only three-token subject has no replacement
    facts = [KnownFact(i, s, average_module._top_token(lm, p), p) for i, (s, p) in enumerate(prompts.items())]
    result = average_effects(lm, facts, "hidden", samples=2, corrupt="replace", approx="atp", out_dir=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "facts.jsonl").read_text().splitlines()]
    traced = [r for r in records if r["scores"]]
    assert result.n_correct == len(traced) >= 1 and result.n_skipped == 0
    assert "no_replacement" in records[3] and not records[3]["scores"]
    for record in traced:
        assert record["replacements"] and all(len(r.split()) == len(facts[record["known_id"]].subject.split())
                                              for r in record["replacements"])
    assert result.n_no_replacement == sum("no_replacement" in r for r in records)
    assert "ESTIMATES (atp)" in result.markdown() and "subject tokens replaced" in result.markdown()


@pytest.mark.slow  # about 8 s on 2 shared cores
def test_runs_compare_from_their_folders(tmp_path):
    """trace-compare rebuilds each run's average from facts.jsonl (as far as a run got) and writes
    a table and a figure; mismatched labels and folders that are not runs are clear errors."""
    from click.testing import CliRunner

    from factedit.cli import main
    from factedit.errors import InputError
    from factedit.trace.compare import comparison_markdown, read_average

    lm = from_model(tiny_model("llama"), word_tokenizer(), name="tiny-llama")
    facts = tiny_facts(lm)
    runs = {name: average_effects(lm, facts, "hidden", samples=2, noise=noise, out_dir=tmp_path / name)
            for name, noise in (("weak", 0.5), ("strong", 2.0))}
    for name, result in runs.items():
        assert read_average(tmp_path / name).to_dict() == result.to_dict()
    table = comparison_markdown({name: read_average(tmp_path / name) for name in runs})
    layer, value = runs["strong"].peak("hidden", "last_subject")
    assert f"| hidden, last subject | strong | {layer} ({lm.n_layers}) |" in table and f"{value:.3f}" in table

    stem = tmp_path / "compared"
    out = CliRunner().invoke(main, ["trace-compare", str(tmp_path / "weak"), str(tmp_path / "strong"),
                                    "--label", "noise 0.5", "--label", "noise 2", "-o", str(stem)])
    assert out.exit_code == 0, out.output
    assert "noise 0.5" in stem.with_suffix(".md").read_text() and stem.with_suffix(".png").stat().st_size > 0
    out = CliRunner().invoke(main, ["trace-compare", str(tmp_path / "weak"), "--label", "a", "--label", "b",
                                    "-o", str(stem)])
    assert out.exit_code != 0 and "2 --label for 1 runs" in out.output
    with pytest.raises(InputError, match="not a trace-avg folder"):
        read_average(tmp_path)


def test_known_facts_loader(data_dir, tmp_path):
    facts = load_known_facts(data_dir / "known_1000.json")
    assert len(facts) == 1209 and facts[0].subject == "Vinson Massif" and facts[0].attribute == "Antarctica"
    bad = tmp_path / "bad.json"
    bad.write_text('[{"known_id": 1, "subject": "x"}]')
    with pytest.raises(DatasetError, match="lacks attribute, prompt"):
        load_known_facts(bad)
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_known_facts(bad)
    with pytest.raises(DatasetError, match="not found"):
        load_known_facts(tmp_path / "missing.json")
