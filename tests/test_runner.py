import json
import re

import pytest
import torch
from click.testing import CliRunner
from tiny import tiny_model, word_tokenizer

from factedit.cli import main
from factedit.edit import get_method
from factedit.edit import history as history_module
from factedit.evaluate import cases as cases_module
from factedit.evaluate import runner as runner_module
from factedit.evaluate.runner import run_evaluation
from factedit.models import from_model


def counterfact_file(tmp_path):
    subjects = ["The Eiffel Tower", "The Space Needle", "Michael Jordan"]
    records = [{"case_id": 10 + i, "requested_rewrite": {"prompt": "{} is located in the city of", "subject": s,
                                                         "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
                "paraphrase_prompts": [f"The city of Berlin . {s} is located in the city of"],
                "neighborhood_prompts": ["The Space Needle is in the city of", "The capital of France is"],
                "attribute_prompts": ["The Colosseum is in the city of"],
                "generation_prompts": [f"{s} is", f"The city of {s} is"]}
               for i, s in enumerate(subjects)]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture()
def env(tmp_path, word_corpus):
    return from_model(tiny_model("llama"), word_tokenizer(), name="tiny"), counterfact_file(tmp_path)


def test_runner_scores_against_the_unedited_model_and_resumes(env, tmp_path, monkeypatch):
    lm, data = env
    out = tmp_path / "run"
    summary = run_evaluation(lm, "ft", "counterfact", out, data=str(data), n=2,
                             settings=get_method("ft").defaults(lm, 1, lr=1e-2))
    assert summary["cases"] == 2 and sorted(p.name for p in (out / "cases").iterdir()) == ["10.json", "11.json"]
    case = json.loads((out / "cases" / "10.json").read_text())
    # Both cases see the same unedited model: their pre-edit neighbourhood numbers are identical.
    other = json.loads((out / "cases" / "11.json").read_text())
    assert case["pre"]["p_new"]["neighborhood"] == other["pre"]["p_new"]["neighborhood"]
    assert case["post_scores"]["ES"] == 1.0 and case["pre_scores"]["ES"] == 0.0
    assert summary["post"]["ES"]["mean"] == 100.0

    def must_not_edit(*args, **kwargs):
        raise AssertionError("finished cases must not be edited again")

    monkeypatch.setattr(runner_module, "edit", must_not_edit)
    again = run_evaluation(lm, "ft", "counterfact", out, data=str(data), n=2,
                           settings=get_method("ft").defaults(lm, 1, lr=1e-2))
    assert again["post"] == summary["post"]


def test_cli_eval_and_summarize(env, tmp_path):
    lm, data = env
    folder = tmp_path / "model"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    runner = CliRunner()
    for method in ("none", "ft-l"):
        result = runner.invoke(main, ["eval", "--model", str(folder), "--method", method, "--dataset", "counterfact",
                                      "--data", str(data), "--n", "3", "--edits-per-batch", "2", "--layer", "1",
                                      "--out", str(tmp_path / method)])
        assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["summarize", str(tmp_path / "none"), str(tmp_path / "ft-l"),
                                  "--plot-by-edits", str(tmp_path / "by_edits"), "--plot", str(tmp_path / "bars")])
    assert result.exit_code == 0 and "| unedited |" in result.output and "| ft-l |" in result.output
    assert (tmp_path / "by_edits.png").stat().st_size > 0 and (tmp_path / "by_edits.svg").exists()
    assert (tmp_path / "bars.png").stat().st_size > 0
    bad = runner.invoke(main, ["eval", "--model", str(folder), "--method", "none", "--dataset", "nope",
                               "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown dataset" in bad.output


def test_zsre_loader_and_runner(env, tmp_path, data_dir):
    from factedit.data import DatasetError, load_zsre

    records = load_zsre(data_dir / "zsre" / "zsre_train_1k.json")
    assert len(records) == 998 and 534 not in {r.case_id for r in records}
    assert records[0].request.target_new == " unmanned aircraft"
    assert records[0].request.target_true == " uniform" and records[0].loc.startswith("nq question:")
    bad = tmp_path / "z.json"
    bad.write_text(json.dumps([{"subject": "x", "src": "y?"}]))
    with pytest.raises(DatasetError, match="lacks rephrase"):
        load_zsre(bad)

    lm, _ = env
    data = tmp_path / "tiny_zsre.json"
    data.write_text(json.dumps([{"subject": "The Eiffel Tower", "src": "The Eiffel Tower is located in the city of",
                                 "rephrase": "The Space Needle . The Eiffel Tower is in the city of", "alt": "Rome",
                                 "answers": ["Paris"], "loc": "The capital of France is", "loc_ans": "Paris"}]))
    summary = run_evaluation(lm, "ft", "zsre", tmp_path / "z", data=str(data), settings=get_method("ft").defaults(lm, 1, lr=1e-2))
    assert summary["post"]["efficacy"]["mean"] == 100.0 and summary["pre"]["efficacy"]["mean"] == 0.0
    assert "specificity" in summary["post"]


def test_runner_generation_metrics(env, tmp_path):
    lm, data = env
    summary = run_evaluation(lm, "none", "counterfact", tmp_path / "g", data=str(data), n=1, generation=True,
                             generation_tokens=12)
    case = json.loads((tmp_path / "g" / "cases" / "10.json").read_text())
    assert len(case["generated"]) == 2 and len(case["references"]) == 1
    assert 0 < summary["post"]["GE"]["mean"] < 1000 and 0 <= summary["post"]["RS*"]["mean"] <= 100


def test_reference_generations_are_cached_across_runs(env, tmp_path, monkeypatch):
    lm, data = env
    run_evaluation(lm, "none", "counterfact", tmp_path / "a", data=str(data), n=1, generation=True,
                   generation_tokens=8)
    calls = []
    real = cases_module.generations
    monkeypatch.setattr(cases_module, "generations", lambda lm, prompts, *a: calls.append(prompts) or real(lm, prompts, *a))
    run_evaluation(lm, "none", "counterfact", tmp_path / "b", data=str(data), n=1, generation=True,
                   generation_tokens=8)
    assert calls == [["The Eiffel Tower is", "The city of The Eiffel Tower is"]]  # only the edited model's texts
    first, second = (json.loads((tmp_path / d / "cases" / "10.json").read_text()) for d in "ab")
    assert first["references"] == second["references"] and first["generated"] == second["generated"]


def test_sequential_runner_accumulates_resumes_and_restores(env, tmp_path, monkeypatch):
    lm, data = env
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    settings = get_method("ft").defaults(lm, 1, lr=1e-2)
    out = tmp_path / "seq"
    first = run_evaluation(lm, "ft", "counterfact", out, data=str(data), n=2, settings=settings, sequential=True)
    assert first["cases"] == 2 and len(list((out / "history").glob("batch_*.safetensors"))) == 2
    assert all(torch.equal(weights[k], v) for k, v in lm.model.state_dict().items())
    case_11 = json.loads((out / "cases" / "11.json").read_text())
    # Case 11 was edited on top of case 10: its pre scores are the unedited model's, as for case 10.
    case_10 = json.loads((out / "cases" / "10.json").read_text())
    assert case_11["pre"]["p_new"]["neighborhood"] == case_10["pre"]["p_new"]["neighborhood"]
    # Scored again once all edits are in: the last case's numbers cannot have moved, the first's did.
    assert case_11["final"] == case_11["post"] and case_10["final"] != case_10["post"]
    assert "final" in first and "after all 2 edits" in runner_module.markdown_table([first])
    # Measured after every batch: batch 0 is the unedited model, whose weights have not grown.
    points = [json.loads(line) for line in (out / "lifelong.jsonl").read_text().splitlines()]
    assert [p["batch"] for p in points] == [0, 1, 2] and [p["n_edits"] for p in points] == [0, 1, 2]
    assert points[0]["norm_growth"] == {} and points[2]["norm_growth"] and points[2]["edits_kept"] is not None
    assert (out / "lifelong.png").exists() and first["lifelong"]["last"]["batch"] == 2
    calls = []
    original = history_module.edit
    monkeypatch.setattr(history_module, "edit", lambda *a, **k: calls.append(1) or original(*a, **k))
    resumed = run_evaluation(lm, "ft", "counterfact", out, data=str(data), n=3, settings=settings, sequential=True)
    assert resumed["cases"] == 3 and len(calls) == 1  # only the new case is edited; the others replayed
    table = CliRunner().invoke(main, ["summarize", str(out), "--plot-lifelong", str(tmp_path / "lifelong")])
    assert table.exit_code == 0, table.output
    assert re.search(r"\| seq \| 3 \| 3 \| [01]\.\d{3} \(", table.output) and (tmp_path / "lifelong.png").exists()
    single = tmp_path / "single"
    run_evaluation(lm, "ft", "counterfact", single, data=str(data), n=1, settings=settings)
    refused = CliRunner().invoke(main, ["summarize", str(single), "--plot-lifelong", str(tmp_path / "none")])
    assert refused.exit_code != 0 and "made with --sequential" in refused.output


@pytest.mark.parametrize("edits_per_batch", [1, 2])
def test_a_killed_sequential_run_resumes_to_the_same_numbers(env, tmp_path, monkeypatch, edits_per_batch):
    """Killed during the last batch's edit, with the case files of the batch before it not all written
    (one edit per batch: that batch saved but not scored; two: scored in part)."""
    lm, data = env
    settings = get_method("ft").defaults(lm, 1, lr=1e-2)
    whole = tmp_path / "whole"
    run_evaluation(lm, "ft", "counterfact", whole, data=str(data), n=3, settings=settings, sequential=True,
                   edits_per_batch=edits_per_batch)
    original, calls = history_module.edit, []
    last_batch = -(-3 // edits_per_batch)

    def dies_on_the_last_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == last_batch:
            raise KeyboardInterrupt  # a kill mid-sequence
        return original(*args, **kwargs)

    monkeypatch.setattr(history_module, "edit", dies_on_the_last_batch)
    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(lm, "ft", "counterfact", broken, data=str(data), n=3, settings=settings, sequential=True,
                       edits_per_batch=edits_per_batch)
    assert len(list((broken / "cases").iterdir())) == 2
    (broken / "cases" / "11.json").unlink()  # killed after case 11's batch was saved, before its case was written
    monkeypatch.setattr(history_module, "edit", original)
    run_evaluation(lm, "ft", "counterfact", broken, data=str(data), n=3, settings=settings, sequential=True,
                   edits_per_batch=edits_per_batch)
    for case_id in (10, 11, 12):
        a, b = (json.loads((run / "cases" / f"{case_id}.json").read_text()) for run in (whole, broken))
        assert a["post"] == b["post"] and a["final"] == b["final"]
    whole_points, broken_points = ([{k: v for k, v in json.loads(line).items() if k != "seconds"}
                                    for line in (run / "lifelong.jsonl").read_text().splitlines()]
                                   for run in (whole, broken))
    assert whole_points == broken_points and len(whole_points) == last_batch + 1


def test_a_run_killed_while_scoring_after_all_goes_on_and_a_finished_run_is_not_replayed(env, tmp_path,
                                                                                         monkeypatch):
    lm, data = env
    settings = get_method("ft").defaults(lm, 1, lr=1e-2)
    args = dict(data=str(data), n=3, settings=settings, sequential=True)
    run_evaluation(lm, "ft", "counterfact", tmp_path / "whole", **args)
    original, finals = cases_module.write_json, []

    def counts_finals(path, value, dies_at=None):
        if "final_after" in value:
            finals.append(path.stem)
            if len(finals) == dies_at:
                raise KeyboardInterrupt  # a kill while scoring after all edits
        return original(path, value)

    broken = tmp_path / "broken"
    monkeypatch.setattr(cases_module, "write_json", lambda p, v: counts_finals(p, v, dies_at=2))
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(lm, "ft", "counterfact", broken, **args)
    assert finals == ["10", "11"]  # case 10 scored after all, case 11 not written
    finals.clear()
    monkeypatch.setattr(cases_module, "write_json", counts_finals)
    resumed = run_evaluation(lm, "ft", "counterfact", broken, **args)
    assert finals == ["11", "12"] and "final" in resumed
    for case_id in (10, 11, 12):
        a, b = (json.loads((run / "cases" / f"{case_id}.json").read_text()) for run in (tmp_path / "whole", broken))
        assert a["final"] == b["final"] and b["final_after"] == 3

    finals.clear()  # finished: a rerun (e.g. after a kill before the summary) replays and scores nothing
    replays = []
    monkeypatch.setattr(history_module.EditHistory, "replay", lambda self, count=None: replays.append(count))
    (broken / "summary.json").unlink()
    again = run_evaluation(lm, "ft", "counterfact", broken, **args)
    assert replays == [] and finals == [] and again["final"] == resumed["final"]
    assert (broken / "summary.json").exists()


def test_resuming_with_other_settings_is_refused_and_says_what_differs(env, tmp_path):
    lm, data = env
    run_evaluation(lm, "none", "counterfact", tmp_path / "r", data=str(data), n=1)
    with pytest.raises(ValueError, match="method: 'none' -> 'ft-l'"):
        run_evaluation(lm, "ft-l", "counterfact", tmp_path / "r", data=str(data), n=1)
    run_evaluation(lm, "none", "counterfact", tmp_path / "r", data=str(data), n=2)  # only n may change
    copy = tmp_path / "elsewhere" / "cf.json"  # the same data under another path (a folder mounted again)
    copy.parent.mkdir()
    copy.write_bytes(data.read_bytes())
    run_evaluation(lm, "none", "counterfact", tmp_path / "r", data=str(copy), n=2)
    copy.write_text(copy.read_text().replace("Rome", "Berlin"))
    with pytest.raises(ValueError, match="data_digest: "):
        run_evaluation(lm, "none", "counterfact", tmp_path / "r", data=str(copy), n=2)
    saved = json.loads((tmp_path / "r" / "settings.json").read_text())
    assert len(saved["sessions"]) == 3  # one per run that wrote to the folder, none for the refused ones


def test_a_run_folder_from_before_later_fields_and_sessions_resumes_and_gains_them(env, tmp_path):
    """A folder written before start, data_digest and the sessions were recorded (the committed runs
    under docs/results) resumes, with any data (its digest is unknown), and records the resuming session."""
    lm, data = env
    run_evaluation(lm, "none", "counterfact", tmp_path / "r", data=str(data), n=1)
    path = tmp_path / "r" / "settings.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items()
                                if k not in ("start", "data_digest", "sessions")}))
    run_evaluation(lm, "none", "counterfact", tmp_path / "r", data=str(data), n=2)
    saved = json.loads(path.read_text())
    assert saved["start"] == 0 and saved["data_digest"] and len(saved["sessions"]) == 2
    assert saved["sessions"][0] == {"version": None, "revision": None, "dirty": None, "started": None}
    assert set(saved["sessions"][1]) == {"version", "revision", "dirty", "started"}
    assert runner_module.summarize(tmp_path / "r")["cases"] == 2


def test_generative_scores_come_from_greedy_continuations_of_each_prompt(env, tmp_path):
    from factedit.evaluate.datasets import greedy_groups
    from factedit.generate import greedy_continuation

    lm, data = env
    groups = {"rewrite": ["The Eiffel Tower is located in the city of"],
              "paraphrase": ["Paris", "The city of Berlin . The Space Needle is located in the city of"]}
    found = greedy_groups(lm, groups, [" Rome", " Paris"])  # one batch, prompts of different lengths
    for group, prompts in groups.items():
        assert found[group] == [greedy_continuation(lm, p, 1 + 5) for p in prompts]
    summary = run_evaluation(lm, "ft", "counterfact", tmp_path / "run", data=str(data), n=1,
                             settings=get_method("ft").defaults(lm, 1, lr=1e-2))
    case = json.loads((tmp_path / "run" / "cases" / "10.json").read_text())
    texts = case["post"]["greedy"]["rewrite"] + case["post"]["greedy"]["paraphrase"]
    assert case["post_scores"]["GenES"] == float(case["post"]["greedy"]["rewrite"][0].lstrip().startswith("Rome"))
    assert case["post_scores"]["GenOld"] == sum("Paris" in t for t in texts) / len(texts)
    assert {"GenES", "GenPS", "GenOld"} <= set(summary["post"])


def test_start_takes_a_later_slice_and_is_part_of_the_run(env, tmp_path):
    lm, data = env
    settings = get_method("ft").defaults(lm, 1, lr=1e-2)
    summary = run_evaluation(lm, "ft", "counterfact", tmp_path / "run", data=str(data), n=2, start=1, settings=settings)
    assert summary["cases"] == 2 and sorted(p.name for p in (tmp_path / "run" / "cases").iterdir()) == ["11.json",
                                                                                                      "12.json"]
    with pytest.raises(ValueError, match="start: 1 -> 0"):
        run_evaluation(lm, "ft", "counterfact", tmp_path / "run", data=str(data), n=2, settings=settings)
    with pytest.raises(ValueError, match="start must be 0 or more"):
        run_evaluation(lm, "ft", "counterfact", tmp_path / "other", data=str(data), n=2, start=-1, settings=settings)


def test_cli_eval_shows_the_first_edits_statistics_and_prefixes_with_their_totals(env, tmp_path):
    lm, data = env  # word_corpus: a fresh cache folder, nothing computed yet
    folder = tmp_path / "model"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    args = ["eval", "--model", str(folder), "--method", "rome", "--dataset", "counterfact", "--data", str(data),
            "--n", "2", "--layer", "1", "--tokens", "300", "--out", str(tmp_path / "rome")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert re.search(r"key statistics: 100%.*300/300", result.output)
    assert re.search(r"context prefixes: 100%", result.output)
    assert "value optimisation" not in result.output  # per edit, counted by the cases bar instead


def test_lifelong_probe_counts_the_untouched_known_facts_and_measures_perplexity(env, word_corpus):
    from factedit.data.known import KnownFact
    from factedit.edit import EditHistory, EditRequest
    from factedit.evaluate.lifelong import LifelongProbe
    from factedit.stats import corpus_from

    lm, _ = env
    prompt = "The Space Needle is located in the city of"
    with torch.no_grad():
        ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
        answer = lm.tokenizer.decode(lm.model(input_ids=ids).logits[0, -1].argmax())
    wrong = "Seattle" if answer.strip() != "Seattle" else "Rome"
    facts = [KnownFact(1, "The Space Needle", answer.strip(), prompt),  # answered
             KnownFact(2, "The Space Needle", wrong, prompt),  # not answered: does not count
             KnownFact(3, "The Eiffel Tower", answer.strip(), prompt.replace("Space Needle", "Eiffel Tower"))]
    edited = [EditRequest.create("{} is located in the city of", "the eiffel tower", "Rome", "Paris")]  # touches fact 3
    held_out = corpus_from(str(word_corpus))
    probe = LifelongProbe(lm, edited, held_out=held_out, known=facts, ppl_tokens=64)
    assert [f.known_id for f in probe.known] == [1]
    point = probe.measure(EditHistory(lm), 0, [])
    assert point.known_kept == 1.0 and point.known_count == 1 and point.edits_kept is None
    # The slow reference: the text's tokens one forward pass each, the next token's log-probability.
    chunk = lm.tokenizer(word_corpus.read_text(), add_special_tokens=False).input_ids[:64]  # 3,000 words: no EOS yet
    nll = []
    with torch.no_grad():
        for i in range(1, len(chunk)):
            logits = lm.model(input_ids=torch.tensor([chunk[:i]])).logits[0, -1]
            nll.append(-torch.log_softmax(logits.float(), -1)[chunk[i]])
    assert point.perplexity == pytest.approx(float(torch.exp(torch.stack(nll).mean())), rel=1e-4)


def test_score_after_all_goes_on_where_it_stopped_and_refuses_another_requests_case(tmp_path):
    """Cases already scored after all edits are skipped; a case file of another request is refused."""
    from types import SimpleNamespace

    from factedit.errors import InputError
    from factedit.request import EditRequest

    class Scored:  # counts what it scores; the scores themselves do not matter here
        def __init__(self):
            self.scored = []

        def probabilities(self, lm, record):
            self.scored.append(record.case_id)
            return {"p": 0.5}

        def scores(self, probabilities):
            return {"ES": 1.0}

    records = [SimpleNamespace(case_id=i, request=EditRequest.create("{} is in", s, "Rome"))
               for i, s in enumerate(["Paris", "Berlin", "Oslo"])]
    (tmp_path / "cases").mkdir()
    for record, final_after in zip(records, [3, None, 2]):  # scored after all; not yet; after fewer edits
        (tmp_path / "cases" / f"{record.case_id}.json").write_text(
            json.dumps({"request": record.request.to_dict(), "final_after": final_after}))
    ds = Scored()
    assert not cases_module.scored_after_all(tmp_path, records)
    cases_module.score_after_all(None, ds, tmp_path, records)
    assert ds.scored == [1, 2]
    assert cases_module.scored_after_all(tmp_path, records)
    other = EditRequest.create("{} is in", "Rome", "Paris").to_dict()
    (tmp_path / "cases" / "2.json").write_text(json.dumps({"request": other, "final_after": 3}))
    assert not cases_module.scored_after_all(tmp_path, records)
    with pytest.raises(InputError, match="2.json holds the case of another request"):
        cases_module.score_after_all(None, ds, tmp_path, records)


def test_a_sequential_run_on_a_folder_another_run_writes_is_refused_before_editing(env, tmp_path):
    """Two sequential runs on one --out would both save batch N of one history: the second is refused."""
    from factedit.folder_lock import FolderBusyError, FolderLock

    lm, data = env
    out = tmp_path / "seq"
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with FolderLock(out / "history", "history.lock", "history folder"):
        with pytest.raises(FolderBusyError, match="in use by another process"):
            run_evaluation(lm, "ft", "counterfact", out, data=str(data), n=2,
                           settings=get_method("ft").defaults(lm, 1, lr=1e-2), sequential=True)
    assert not list((out / "history").glob("batch_*")) and not list((out / "cases").glob("*.json"))
    assert all(torch.equal(weights[k], v) for k, v in lm.model.state_dict().items())


def test_an_evaluation_run_in_a_folder_another_run_holds_is_refused_before_any_case(env, tmp_path):
    """Two `eval` runs resuming one --out would both score its missing cases: the second is refused,
    and the folder is the first one's again once it is done."""
    from factedit.folder_lock import FolderBusyError, FolderLock
    from factedit.run_folder import LOCK_FILE

    lm, data = env
    out = tmp_path / "run"
    settings = get_method("ft").defaults(lm, 1, lr=1e-2)
    with FolderLock(out, LOCK_FILE, "run folder"):
        with pytest.raises(FolderBusyError, match="run folder .* is in use by another process"):
            run_evaluation(lm, "ft", "counterfact", out, data=str(data), n=1, settings=settings)
    assert not (out / "settings.json").exists() and not list((out / "cases").glob("*.json"))
    run_evaluation(lm, "ft", "counterfact", out, data=str(data), n=1, settings=settings)
    assert len(list((out / "cases").glob("*.json"))) == 1
    with FolderLock(out, LOCK_FILE, "run folder"):  # the finished run let the folder go
        pass
