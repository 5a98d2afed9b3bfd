"""Bad input gives one clear error, bugs keep their traceback (issue 12, items 7-12).

Counts on the command line, settings files, dataset field types, the current target, unknown models
offline, the prompt-length limit, and the line between user errors (FacteditError: one line, exit
code 2, HTTP 400) and internal errors (traceback, HTTP 500). Tiny random models throughout."""

import dataclasses
import json
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from tiny import tiny_model, word_tokenizer

from factedit.cli import main
from factedit.cli.options import CommandError
from factedit.data import DatasetError, load_counterfact, load_known_facts, load_zsre
from factedit.edit import EditRequest, RomeSettings, edit, get_method
from factedit.edit.kn import KnSettings
from factedit.errors import FacteditError, InputError
from factedit.evaluate.runner import run_evaluation
from factedit.generate import with_current_target
from factedit.models import ModelLoadError, load
from factedit.settings import SettingsError
from factedit.tokens import MAX_PROMPT_TOKENS, PromptError, check_prompt_length

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"


def save_tiny(folder, mute=False):
    """A tiny Llama saved as a model folder; `mute`: its unembedding is zero, so every next token is
    token 0, the padding token, which decodes to nothing (no object to take as the current target)."""
    model = tiny_model("llama")
    if mute:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


def counterfact(records):
    return [{"case_id": i, "requested_rewrite": {"prompt": "{} is located in the city of", "subject": s,
                                                 "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
             "paraphrase_prompts": [f"{s} is in the city of"], "neighborhood_prompts": ["The Space Needle is in"]}
            for i, s in records]


def write(path, data):
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------------------- 7: counts, datasets
@pytest.mark.parametrize("args, option", [
    (["eval", "--method", "rome", "--dataset", "counterfact", "-o", "x", "--n", "0"], "--n"),
    (["eval", "--method", "rome", "--dataset", "counterfact", "-o", "x", "--n", "-1"], "--n"),
    (["eval", "--method", "rome", "--dataset", "counterfact", "-o", "x", "--edits-per-batch", "0"], "--edits-per-batch"),
    (["eval", "--method", "rome", "--dataset", "counterfact", "-o", "x", "--start", "-1"], "--start"),
    (["eval", "--method", "rome", "--dataset", "counterfact", "-o", "x", "--generation-tokens", "0"],
     "--generation-tokens"),
    (["eval", "--method", "rome", "--dataset", "counterfact", "-o", "x", "--layer", "-1"], "--layer"),
    (["sequential", "--n", "0"], "--n"),
    (["sequential", "--measure-every", "0"], "--measure-every"),
    (["trace", "-p", PROMPT, "-s", SUBJECT, "--samples", "0"], "--samples"),
    (["trace", "-p", PROMPT, "-s", SUBJECT, "--window", "0"], "--window"),
    (["trace", "-p", PROMPT, "-s", SUBJECT, "--noise", "-1"], "--noise"),
    (["trace-avg", "--n", "0"], "--n"),
    (["generate", "-p", PROMPT, "--max-new", "0"], "--max-new"),
    (["stats", "--layer", "1", "--tokens", "0"], "--tokens"),
    (["edit", "-p", PROMPT, "-s", SUBJECT, "-t", "Rome", "--threads", "0"], "--threads"),
    (["edit", "-p", PROMPT, "-s", SUBJECT, "-t", "Rome", "--dtype", "float8"], "--dtype"),
])
def test_counts_are_checked_on_the_command_line_before_anything_runs(tmp_path, args, option):
    # A model that does not exist: had the value been accepted, loading it would fail with another message.
    result = CliRunner().invoke(main, args + ["--model", str(tmp_path / "no-model")])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output, result.output


@pytest.mark.parametrize("args, message", [
    (["eval", "--method", "magic", "--dataset", "counterfact", "-o", "x"], "unknown method 'magic'"),
    (["eval", "--method", "rome", "--dataset", "cf", "-o", "x"], "unknown dataset 'cf'"),
    (["eval", "--method", "rome", "--dataset", "counterfact", "-o", "x", "--data", "missing.json"],
     "'--data': File 'missing.json' does not exist"),
    (["sequential", "--method", "rome", "--method", "magic"], "unknown method 'magic'"),
    (["sequential", "--dataset", "cf"], "unknown dataset 'cf'"),
])
def test_method_dataset_and_data_file_are_checked_before_the_model_loads(tmp_path, args, message):
    result = CliRunner().invoke(main, args + ["--model", str(tmp_path / "no-model")])
    assert result.exit_code != 0 and message in result.output, result.output


def test_loaders_refuse_bad_counts_empty_files_and_repeated_ids(tmp_path):
    data = write(tmp_path / "cf.json", counterfact([(0, "The Eiffel Tower"), (1, "The Space Needle")]))
    assert len(load_counterfact(data, n=1)) == 1 and len(load_counterfact(data)) == 2
    for n in (0, -1):
        with pytest.raises(InputError, match=f"at least 1 .* not {n}"):
            load_counterfact(data, n=n)
    for loader in (load_counterfact, load_zsre, load_known_facts):
        with pytest.raises(DatasetError, match="holds no .* records"):
            loader(write(tmp_path / "empty.json", []))
    with pytest.raises(DatasetError, match="records 0 and 2 have the same case_id 7"):
        load_counterfact(write(tmp_path / "dup.json", counterfact([(7, "The Eiffel Tower"), (8, "The Space Needle"),
                                                                    (7, "Michael Jordan")])))
    fact = {"subject": "Paris", "attribute": "France", "prompt": "Paris is in"}
    with pytest.raises(DatasetError, match="same known_id 3"):
        load_known_facts(write(tmp_path / "known.json", [{"known_id": 3, **fact}, {"known_id": 3, **fact}]))


def test_eval_refuses_bad_counts_and_an_empty_selection(tiny_llama, tmp_path):
    data = write(tmp_path / "cf.json", counterfact([(0, "The Eiffel Tower"), (1, "The Space Needle")]))
    kwargs = dict(data=str(data), settings=get_method("none").defaults(tiny_llama))
    with pytest.raises(InputError, match="n must be at least 1"):
        run_evaluation(tiny_llama, "none", "counterfact", tmp_path / "a", n=0, **kwargs)
    with pytest.raises(InputError, match="edits_per_batch must be at least 1"):
        run_evaluation(tiny_llama, "none", "counterfact", tmp_path / "b", edits_per_batch=0, **kwargs)
    with pytest.raises(InputError, match="start 5 skips all 2 records"):
        run_evaluation(tiny_llama, "none", "counterfact", tmp_path / "c", start=5, **kwargs)


# ------------------------------------------------------------------------------------ 8: settings
@pytest.mark.parametrize("content, message", [
    ([{"layer": 1}], "settings must be a JSON object of RomeSettings fields, not a list"),
    ("layer 1", "is not valid JSON"),
    ({"layer": "5"}, "RomeSettings field 'layer' must be an integer, not a string ('5')"),
    ({"layer": True}, "field 'layer' must be an integer, not a boolean (True)"),
    ({"layer": 1.5}, "field 'layer' must be an integer, not a number (1.5)"),
    ({"layer": 1, "v_lr": "fast"}, "field 'v_lr' must be a finite number, not a string"),
    ({"layer": 1, "stats_corpus": 5}, "field 'stats_corpus' must be a string or null, not a number (5)"),
    ({"layer": 1, "value_through_update": 1},
     "field 'value_through_update' must be a boolean (true or false), not a number"),
    ({"layer": 1, "prefix_lengths": [[5, "10"]]},
     "field 'prefix_lengths' must be a list of lists of integers, but prefix_lengths[0][1] is a string ('10')"),
    ({"layer": 1, "prefix_lengths": 5}, "must be a list of lists of integers, not a number (5)"),
    ({"v_lr": 0.5}, "RomeSettings needs the field(s) layer"),
    ({"layer": 1, "colour": "red"}, "unknown RomeSettings fields: colour"),
])
def test_settings_files_are_type_checked_when_loaded(tmp_path, content, message):
    path = tmp_path / "settings.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(SettingsError) as caught:
        RomeSettings.load(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_settings_types_accept_what_the_annotations_allow(tmp_path):
    settings = RomeSettings.from_dict({"layer": 1, "v_lr": 1, "stats_corpus": None, "prefix_lengths": [[3, 2]]})
    assert settings.v_lr == 1.0 and isinstance(settings.v_lr, float) and settings.prefix_lengths == [[3, 2]]
    assert KnSettings.from_dict({"layers": None}).layers is None
    with pytest.raises(SettingsError, match=r"'layers' must be a list of integers or null, but layers\[1\] is a string"):
        KnSettings.from_dict({"layers": [1, "2"]})
    with pytest.raises(SettingsError, match="'threshold' must be a finite number, not a number"):
        KnSettings.from_dict({"threshold": float("nan")})


def test_settings_are_checked_against_the_method_and_the_model(tiny_llama, tmp_path):
    rome = get_method("rome")
    for content, message in (({"layer": 99}, "layer 99 out of range: the model has 3 layers"),
                             ({"layer": 1, "early_stop_on": "loss"}, "early_stop_on must be 'nll' or 'total'"),
                             ({"layer": 1, "key_mode": "original"}, "key_mode must be 'consistent' for method rome")):
        with pytest.raises(SettingsError, match=message):
            rome.load_settings(tiny_llama, write(tmp_path / "s.json", content))
    memit = get_method("memit")
    with pytest.raises(SettingsError, match="layers is empty"):
        memit.check_settings(tiny_llama, dataclasses.replace(memit.defaults(tiny_llama, 1), layers=[]))
    with pytest.raises(InputError, match="layer 3 out of range"):
        rome.settings_with(tiny_llama, 3)
    with pytest.raises(SettingsError, match="no editing method has the setting.s. stats_tokns"):
        rome.settings_with(tiny_llama, 1, stats_tokns=4096)  # misspelt: refused, not dropped
    assert get_method("ft").settings_with(tiny_llama, 1, stats_tokens=4096).layer == 1  # another method's: dropped


def test_cli_settings_errors_are_one_line(tiny_folder, tmp_path):
    base = ["edit", "--model", str(tiny_folder), "-p", "{} is located in the city of", "-s", SUBJECT, "-t", "Rome",
            "--true", "Paris"]
    for content, message in (([1, 2], "not a list"), ({"layer": "5"}, "field 'layer' must be an integer"),
                             ({"layer": 7}, "layer 7 out of range")):
        result = CliRunner().invoke(main, base + ["--settings", str(write(tmp_path / "s.json", content))])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output, result.output
    result = CliRunner().invoke(main, base + ["--settings", str(write(tmp_path / "s.json", {"layer": 1})),
                                              "--layer", "2"])  # before: --layer silently lost to the file
    assert result.exit_code == 2 and "both choose the layer" in result.output, result.output


def test_eval_with_method_none_takes_a_settings_file(tiny_folder, tmp_path):
    data = write(tmp_path / "cf.json", counterfact([(0, "The Eiffel Tower")]))
    args = ["eval", "--model", str(tiny_folder), "--method", "none", "--dataset", "counterfact", "--data", str(data)]
    result = CliRunner().invoke(main, args + ["--settings", str(write(tmp_path / "none.json", {})),
                                              "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["cases"] == 1
    result = CliRunner().invoke(main, args + ["--settings", str(write(tmp_path / "rome.json", {"layer": 1})),
                                              "-o", str(tmp_path / "run2")])
    assert result.exit_code == 2 and "unknown NoSettings fields: layer" in result.output, result.output


# -------------------------------------------------------------------------------- 9: dataset types
def test_dataset_field_types_are_named_with_file_record_and_field(tmp_path):
    def counterfact_error(change):
        record = counterfact([(4, "The Eiffel Tower")])[0]
        change(record)
        path = write(tmp_path / "cf.json", [record])
        with pytest.raises(DatasetError) as caught:
            load_counterfact(path)
        assert str(path) in str(caught.value) and "record 0" in str(caught.value)
        return str(caught.value)

    assert ("(case_id 4): requested_rewrite.target_new.str must be a string, not a number (5)"
            in counterfact_error(lambda r: r["requested_rewrite"]["target_new"].update(str=5)))
    assert "requested_rewrite.target_true must be an object, not a string ('Paris')" in counterfact_error(
        lambda r: r["requested_rewrite"].update(target_true="Paris"))
    assert "requested_rewrite.subject must be a string, not null" in counterfact_error(
        lambda r: r["requested_rewrite"].update(subject=None))
    assert "case_id must be an integer, not a string ('4')" in counterfact_error(lambda r: r.update(case_id="4"))
    assert "paraphrase_prompts[1] must be a string, not a number (3)" in counterfact_error(
        lambda r: r["paraphrase_prompts"].append(3))
    assert "requested_rewrite lacks 'target_new'" in counterfact_error(lambda r: r["requested_rewrite"].pop("target_new"))
    assert "(case_id 4): the new target is empty" in counterfact_error(
        lambda r: r["requested_rewrite"]["target_new"].update(str=" "))

    zsre = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "rephrase": "What does UniFirst make?",
            "alt": "aircraft", "answers": ["uniform"], "loc": "nq question: who is", "loc_ans": "Walter"}
    assert load_zsre(write(tmp_path / "z.json", [zsre]))[0].request.target_true == " uniform"
    for change, message in (({"alt": 5}, r"record 0: alt must be a string, not a number \(5\)"),
                            ({"answers": "uniform"}, "answers must be a list, not a string"),
                            ({"answers": [7]}, r"answers\[0\] must be a string, not a number")):
        with pytest.raises(DatasetError, match=message):
            load_zsre(write(tmp_path / "z.json", [{**zsre, **change}]))
    fact = {"known_id": 1, "subject": "Paris", "attribute": "France", "prompt": "Paris is in"}
    for change, message in (({"attribute": 3}, r"record 0 \(known_id 1\): attribute must be a string, not a number"),
                            ({"known_id": "1"}, "known_id must be an integer, not a string")):
        with pytest.raises(DatasetError, match=message):
            load_known_facts(write(tmp_path / "k.json", [{**fact, **change}]))


# ----------------------------------------------------------------------- 10: the current target
def test_the_current_target_is_the_models_next_token_or_a_clear_error(tiny_llama, tmp_path, word_corpus):
    request = EditRequest.create("{} is located in the city of", SUBJECT, "Rome")
    filled = with_current_target(tiny_llama, request)
    assert filled.target_true and filled.target_true.strip() and filled.target_new == " Rome"
    mute = load(str(save_tiny(tmp_path / "mute", mute=True)))
    with pytest.raises(PromptError, match="next token after .* is '' .whitespace or a special token.*give the current"):
        with_current_target(mute, request)
    assert with_current_target(mute, EditRequest.create(PROMPT, SUBJECT, "Rome", "Paris")).target_true == " Paris"

    # The command line and the server follow the same rule.
    result = CliRunner().invoke(main, ["edit", "--model", str(tmp_path / "mute"), "-p", PROMPT, "-s", SUBJECT,
                                       "-t", "Rome", "--layer", "1", "--tokens", "200"])
    assert result.exit_code == 2 and "give the current target (--true" in result.output, result.output
    from factedit.server.app import create_app
    from factedit.server.workbench import Workbench

    with TestClient(create_app(Workbench(mute, stats_corpus=str(word_corpus), stats_tokens=200))) as client:
        job = client.post("/api/edit", json={"prompt": PROMPT, "subject": SUBJECT, "target": "Rome"}).json()
        while job["status"] not in ("done", "error"):
            time.sleep(0.05)
            job = client.get(f"/api/jobs/{job['id']}").json()
    assert job["status"] == "error" and "give the current target" in job["error"], job


# ------------------------------------------------------------- 11: unknown models, prompt length
def test_an_unknown_model_fails_at_once_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    began = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"not a bundled model \(smollm2-135m, gemma3-270m\).*HF_HUB_OFFLINE"):
        load("no-such-org/no-such-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: like a machine offline
    with pytest.raises(ModelLoadError, match="smollm2-135m.*the hub http://127.0.0.1:9 cannot be reached"):
        load("no-such-org/no-such-model")
    with pytest.raises(ModelLoadError, match="not a valid hub id"):
        load("no such model")
    assert time.perf_counter() - began < 20  # the hub client's retries took 46 s


def test_one_prompt_length_limit_everywhere(tiny_llama, tmp_path, tiny_folder, word_corpus):
    words = " ".join(["Paris"] * 600)
    with pytest.raises(PromptError, match="has 600 tokens; at most 64 are allowed .the model's context length"):
        check_prompt_length(tiny_llama, words)  # the tiny model has 64 positions
    tiny_llama.model.config.max_position_embeddings = 4096
    with pytest.raises(PromptError, match=f"has 600 tokens; at most {MAX_PROMPT_TOKENS} are allowed .factedit's"):
        check_prompt_length(tiny_llama, words)
    with pytest.raises(PromptError, match="the prompt has 601 tokens"):
        edit(tiny_llama, EditRequest.create(words + " {}", "Rome", "Paris", "Berlin"), "rome",
             get_method("rome").defaults(tiny_llama, 1))

    long_prompt = " ".join(["Paris"] * 100) + " The Eiffel Tower is located in the city of"
    base = ["edit", "--model", str(tiny_folder), "-s", SUBJECT, "-t", "Rome", "--true", "Paris", "--layer", "1"]
    result = CliRunner().invoke(main, base + ["-p", long_prompt])
    assert result.exit_code == 2 and "the prompt has 109 tokens; at most 64" in result.output, result.output
    result = CliRunner().invoke(main, base + ["-p", PROMPT, "--paraphrase", "Rome is", "--paraphrase", long_prompt])
    assert result.exit_code == 2 and "--paraphrase 2 has 109 tokens" in result.output, result.output

    data = counterfact([(0, "The Eiffel Tower"), (1, "The Space Needle")])
    data[1]["neighborhood_prompts"].append(long_prompt)
    with pytest.raises(PromptError, match=r"counterfact case 1: neighborhood_prompts\[1\] has 109 tokens"):
        run_evaluation(load(str(tiny_folder)), "none", "counterfact", tmp_path / "run",
                       data=str(write(tmp_path / "cf.json", data)))
    assert not list((tmp_path / "run").glob("cases/*.json"))  # refused before the first case

    from factedit.server.app import create_app
    from factedit.server.workbench import Workbench

    lm = load(str(tiny_folder))
    with TestClient(create_app(Workbench(lm, stats_corpus=str(word_corpus), stats_tokens=200))) as client:
        for path, body, message in (
                ("/api/edit", {"prompt": long_prompt, "subject": SUBJECT, "target": "Rome"}, "the prompt has 109"),
                ("/api/edit", {"prompt": PROMPT, "subject": SUBJECT, "target": "Rome", "paraphrases": [long_prompt]},
                 "paraphrase 1 has 109 tokens"),
                ("/api/trace", {"prompt": long_prompt, "subject": SUBJECT}, "the prompt has 109"),
                ("/api/predict", {"prompt": long_prompt}, "the prompt has 109"),
                ("/api/generate", {"prompt": long_prompt}, "the prompt has 109")):
            response = client.post(path, json=body)
            assert response.status_code == 400 and message in response.json()["detail"], (path, response.text)


# ------------------------------------------------------------------- 12: user errors and bugs
def test_user_errors_share_one_base_class():
    from factedit.arch import ArchitectureError
    from factedit.edit.delta import EditFileError

    for error in (PromptError, DatasetError, EditFileError, ModelLoadError, ArchitectureError, SettingsError,
                  InputError):
        assert issubclass(error, FacteditError) and issubclass(error, ValueError), error
    assert issubclass(CommandError, FacteditError)
    with pytest.raises(InputError, match="unknown method 'magic'"):
        get_method("magic")


def test_cli_user_error_is_one_line_and_a_bug_keeps_its_traceback(tiny_folder, tmp_path, monkeypatch):
    def trace(subject):
        return CliRunner().invoke(main, ["trace", "--model", str(tiny_folder), "-p", PROMPT, "-s", subject,
                                         "--samples", "1", "--kind", "hidden", "--out", str(tmp_path / "trace")])

    result = trace("Louvre")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.splitlines()[-1].startswith("error: subject 'Louvre' does not occur"), result.output

    import factedit.trace.runs

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(factedit.trace.runs, "prepare", broken)
    result = trace(SUBJECT)
    assert result.exit_code == 1 and "error: an internal bug" not in result.output
    assert isinstance(result.exception, ValueError) and result.exc_info[2] is not None  # the traceback is kept

    # A real process: the user error is the last line on stderr, with exit code 2 and no traceback.
    process = subprocess.run([sys.executable, "-c", "from factedit.cli import main; main()", "trace", "--model",
                              str(tmp_path / "no-model"), "-p", PROMPT, "-s", SUBJECT], capture_output=True, text=True)
    assert process.returncode == 2 and "Traceback" not in process.stderr, process.stderr
    assert process.stderr.strip().splitlines()[-1].startswith("error: could not load"), process.stderr


def test_server_user_error_is_a_400_and_a_bug_a_500(tiny_llama, word_corpus, monkeypatch):
    from factedit.server.app import create_app
    from factedit.server.workbench import Workbench

    bench = Workbench(tiny_llama, stats_corpus=str(word_corpus), stats_tokens=200)
    with TestClient(create_app(bench), raise_server_exceptions=False) as client:
        response = client.post("/api/trace", json={"prompt": PROMPT, "subject": "Louvre"})
        assert response.status_code == 400 and "does not occur" in response.json()["detail"]

        def broken(*args, **kwargs):
            raise ValueError("an internal bug")

        monkeypatch.setattr(bench, "predictions", broken)
        response = client.post("/api/predict", json={"prompt": PROMPT})
        assert response.status_code == 500 and "an internal bug" not in response.text

        monkeypatch.setattr("factedit.server.workbench.prepare", broken)
        job = client.post("/api/trace", json={"prompt": PROMPT, "subject": SUBJECT, "samples": 1}).json()
        while job["status"] not in ("done", "error"):
            time.sleep(0.05)
            job = client.get(f"/api/jobs/{job['id']}").json()
        assert job["error"] == "ValueError: an internal bug"  # a bug in a job is named as one


def test_precision_and_placement_errors_are_one_line(tiny_folder, monkeypatch):
    """A dtype the device cannot compute in, and an unknown device map, are named before loading."""
    base = ["generate", "--model", str(tiny_folder), "-p", "The Eiffel Tower is located in", "--max-new", "2"]
    result = CliRunner().invoke(main, base + ["--device-map", "everywhere"])
    assert result.exit_code == 2 and "unknown device map 'everywhere'" in result.output, result.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    result = CliRunner().invoke(main, base + ["--device", "cuda:0", "--dtype", "bfloat16"])
    assert result.exit_code == 2 and "cannot compute in bfloat16 (Tesla T4)" in result.output, result.output


def test_device_map_auto_on_a_cpu_machine_runs_the_command(tiny_folder):
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_folder), "-p", "The Eiffel Tower is located in",
                                       "--max-new", "2", "--device-map", "auto", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert "bfloat16" in result.output
