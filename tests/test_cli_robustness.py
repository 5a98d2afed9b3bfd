"""Devices, seeds and output paths are checked before any model loads, in one line (issue 27, items 5
and 12); append-only JSON-lines logs survive a cut-off last line (item 11). Tiny models or none."""

import json
import os
import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from factedit.cache_files import (DamagedLines, append_jsonl, check_output_file, check_output_folder,
                                  read_jsonl)
from factedit.cli import main
from factedit.errors import InputError
from factedit.models import SEED_MAX, check_device, check_seed, load

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"


def run(args):
    return CliRunner().invoke(main, args)


def assert_refused_before_loading(result, message):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "loading" not in result.output, result.output
    assert message in result.output.strip().splitlines()[-1], result.output


# --------------------------------------------------------------------------------------- devices
@pytest.fixture()
def no_gpu(monkeypatch):
    """This machine as a CPU-only one, whatever it really has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.mps, "is_available", lambda: False)


@pytest.mark.parametrize("device, message", [
    ("bogus", "error: unknown device 'bogus'; give cpu, cuda, cuda:N"),
    ("cuda:-1", "error: unknown device 'cuda:-1'"),
    ("meta", "error: device 'meta': models cannot run on 'meta' devices"),
    ("cuda:0", "error: device 'cuda:0': "),
    ("mps", "error: device 'mps': no mps device is available to torch"),
])
def test_a_device_this_machine_lacks_is_refused_before_the_model_loads(device, message, tiny_folder, no_gpu):
    result = run(["generate", "--model", str(tiny_folder), "-p", PROMPT, "--max-new", "1", "--device", device])
    assert_refused_before_loading(result, message)


def test_a_gpu_index_beyond_the_machines_gpus_is_refused(tiny_folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    result = run(["generate", "--model", str(tiny_folder), "-p", PROMPT, "--device", "cuda:2"])
    assert_refused_before_loading(result, "error: device 'cuda:2': this machine has 2 cuda device(s), cuda:0 to cuda:1")


def test_the_library_checks_the_device_in_the_same_place(tiny_folder, no_gpu, monkeypatch):
    import factedit.models

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model must not load on a device that is not there")

    monkeypatch.setattr(factedit.models, "_load_hf", must_not_load)
    for device in ("bogus", "cuda", "cuda:0", torch.device("cuda", 1)):
        with pytest.raises(InputError, match="device"):
            load(str(tiny_folder), device=device)
    assert check_device("cpu") == torch.device("cpu") and check_device(torch.device("cpu")).type == "cpu"
    assert check_device("cpu", torch.float32) == torch.device("cpu")


# ----------------------------------------------------------------------------------------- seeds
def test_the_seed_range_is_what_every_generator_takes():
    """0 .. SEED_MAX is accepted by torch, numpy (both ways of seeding) and random; just outside is not
    by some of them, and check_seed refuses it."""
    for seed in (0, SEED_MAX):
        assert check_seed(seed) == seed
        torch.Generator().manual_seed(seed)
        np.random.default_rng(seed)
        np.random.RandomState(seed)
        random.Random(seed)
    with pytest.raises(ValueError):
        np.random.RandomState(SEED_MAX + 1)
    with pytest.raises(ValueError):
        np.random.default_rng(-1)
    with pytest.raises((ValueError, RuntimeError)):
        torch.Generator().manual_seed(2**70)
    for seed in (-1, SEED_MAX + 1, 2**70, 1.5, "3", True):
        with pytest.raises(InputError, match=f"seed must be a whole number from 0 to {SEED_MAX}"):
            check_seed(seed)
    assert check_seed(np.int64(7)) == 7


@pytest.mark.parametrize("command", [
    ["trace", "-p", PROMPT, "-s", SUBJECT],
    ["trace-avg"],
    ["edit", "-p", "{} is located in the city of", "-s", SUBJECT, "-t", "Rome"],
    ["history", "edit", "some-folder", "-r", "requests.json"],
])
@pytest.mark.parametrize("seed", [str(2**70), "-1", str(SEED_MAX + 1)])
def test_every_seed_option_refuses_what_a_generator_would_refuse(command, seed, tmp_path):
    result = run(command + ["--model", str(tmp_path / "no-model"), "--seed", seed])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '--seed': {seed} is not in the range 0<=x<={SEED_MAX}" in result.output


def test_the_tracing_api_refuses_a_bad_seed_before_any_pass(tiny_llama, monkeypatch):
    from factedit.trace import runs
    from factedit.trace.tracing import trace

    def must_not_run(*args, **kwargs):
        raise AssertionError("no forward pass with a seed that cannot be used")

    monkeypatch.setattr(runs, "last_token_logits", must_not_run)
    for seed in (2**70, -1):
        with pytest.raises(InputError, match="seed must be a whole number"):
            runs.prepare(tiny_llama, PROMPT, SUBJECT, samples=1, seed=seed)
        with pytest.raises(InputError, match="seed must be a whole number"):
            trace(tiny_llama, PROMPT, SUBJECT, samples=1, seed=seed)


def test_averages_and_model_sampled_text_refuse_a_bad_seed_before_writing_or_sampling(tiny_llama, tmp_path):
    from factedit.data.known import KnownFact
    from factedit.stats import model_sampled_corpus
    from factedit.trace.average import average_effects

    facts = [KnownFact(0, "Michael Jordan", "Paris", "Michael Jordan plays basketball in the city of")]
    with pytest.raises(InputError, match="seed must be a whole number"):
        average_effects(tiny_llama, facts, "hidden", samples=1, noise=1.0, seed=2**70, out_dir=tmp_path / "avg")
    assert not (tmp_path / "avg").exists()  # no settings.json that a corrected rerun would be refused by
    with pytest.raises(InputError, match="seed must be a whole number"):
        model_sampled_corpus(tiny_llama, seed=-1)


def test_the_prefix_sampling_refuses_a_bad_seed(tiny_llama, tmp_path):
    from factedit.edit import RomeSettings
    from factedit.edit.prefixes import context_templates

    settings = RomeSettings.defaults_for(tiny_llama, 1, prefix_lengths=[[3, 5]])
    object.__setattr__(settings, "prefix_seed", 2**70)  # past any check on the settings themselves
    with pytest.raises(InputError, match="prefix_seed must be a whole number"):
        context_templates(tiny_llama, settings, cache_dir=tmp_path)
    assert not (tmp_path / "prefixes").exists()


# ---------------------------------------------------------------------------------- output paths
@pytest.fixture()
def specials(tmp_path):
    """Existing paths that are not regular files: writing a file there would replace them."""
    (tmp_path / "target.safetensors").write_bytes(b"keep me")
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "target.safetensors")
    os.mkfifo(tmp_path / "fifo.safetensors")
    return {"a symbolic link": tmp_path / "link.safetensors", "a FIFO": tmp_path / "fifo.safetensors",
            "a character device": "/dev/null"}


def unchanged(specials):
    from pathlib import Path

    link, fifo = specials["a symbolic link"], specials["a FIFO"]
    return (link.is_symlink() and link.read_bytes() == b"keep me" and fifo.is_fifo()
            and Path("/dev/null").is_char_device())


@pytest.mark.parametrize("kind", ["a symbolic link", "a FIFO", "a character device"])
def test_edit_save_onto_a_special_file_is_refused_before_the_model_loads(kind, specials, tiny_folder):
    save = specials[kind]
    result = run(["edit", "--model", str(tiny_folder), "-p", "{} is located in the city of", "-s", SUBJECT,
                  "-t", "Rome", "--method", "ft", "--save", str(save)])
    assert_refused_before_loading(result, f"error: cannot save the edit to {save}: it is {kind}")
    assert unchanged(specials)


def test_export_out_is_checked_before_the_model_loads(tiny_folder, tmp_path, specials):
    (tmp_path / "notes.txt").write_text("a file")
    base = ["export", "--model", str(tiny_folder), "-e", str(tmp_path / "e.safetensors"), "--out"]
    for out, message in [("/dev/null", "it is a character device, not a folder"),
                         (specials["a FIFO"], "it is a FIFO, not a folder"),
                         (tmp_path / "notes.txt" / "model", f"{tmp_path / 'notes.txt'} is not a folder")]:
        result = run(base + [str(out)])
        assert_refused_before_loading(result, f"error: cannot write the edited model to {out}: {message}")
    assert unchanged(specials)


def test_trace_and_eval_output_folders_are_checked_before_the_model_loads(tiny_folder, tmp_path):
    (tmp_path / "notes.txt").write_text("a file")
    out = tmp_path / "notes.txt" / "run"
    model = ["--model", str(tiny_folder)]
    for args in (["trace", "-p", PROMPT, "-s", SUBJECT], ["trace-avg"],
                 ["eval", "--method", "rome", "--dataset", "counterfact"], ["sequential"]):
        result = run(args + model + ["--out", str(out)])
        assert_refused_before_loading(result, f"{tmp_path / 'notes.txt'} is not a folder")


def test_plot_outputs_onto_special_files_are_refused_before_anything_is_read(tmp_path, specials):
    stem = tmp_path / "plot"
    os.symlink(tmp_path / "target.safetensors", f"{stem}.svg")
    (tmp_path / "run").mkdir()  # not an evaluation run: had the plot path passed, reading it would fail
    result = run(["summarize", str(tmp_path / "run"), "--plot", str(stem)])
    assert result.exit_code == 2 and f"error: cannot write the plot to {stem}.svg: it is a symbolic link" \
        in result.output, result.output
    result = run(["trace-compare", str(tmp_path / "run"), "--out", str(stem)])
    assert result.exit_code == 2 and f"error: cannot write the comparison to {stem}.svg: it is a symbolic link" \
        in result.output, result.output
    assert (tmp_path / "target.safetensors").read_bytes() == b"keep me" and not (tmp_path / "plot.md").exists()


def test_output_checks_accept_what_can_be_written(tmp_path):
    (tmp_path / "old.safetensors").write_bytes(b"old")
    check_output_file(tmp_path / "old.safetensors")  # an existing regular file is overwritten
    check_output_file(tmp_path / "new" / "deeper" / "e.safetensors")  # missing folders are created
    check_output_folder(tmp_path)
    check_output_folder(tmp_path / "new" / "deeper")
    (tmp_path / "folder-link").symlink_to(tmp_path)
    check_output_folder(tmp_path / "folder-link")  # files go into the folder it points to
    with pytest.raises(InputError, match="it is a folder; writing would replace it"):
        check_output_file(tmp_path)
    with pytest.raises(InputError, match="it is a file, not a folder"):
        check_output_folder(tmp_path / "old.safetensors")
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["folder-link", "old.safetensors"]  # probes leave nothing


# ------------------------------------------------------------------------------ JSON-lines logs
def test_an_append_after_a_cut_off_line_starts_a_line_of_its_own(tmp_path):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, {"batch": 0})
    append_jsonl(path, {"batch": 1})
    path.write_bytes(path.read_bytes()[:-6])  # killed while writing batch 1: '{"batch": 0}\n{"batch"'
    with pytest.warns(DamagedLines, match="skipped unreadable line"):
        assert read_jsonl(path) == [{"batch": 0}]
    with pytest.warns(DamagedLines, match="dropped its last line, cut off"):
        append_jsonl(path, {"batch": 1, "again": True})
    append_jsonl(path, {"batch": 2})
    assert read_jsonl(path) == [{"batch": 0}, {"batch": 1, "again": True}, {"batch": 2}]
    assert path.read_text().count("\n") == 3


def test_a_whole_last_record_without_its_line_break_is_kept(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}')  # e.g. written by hand
    append_jsonl(path, {"c": 3})
    assert read_jsonl(path) == [{"a": 1}, {"b": 2}, {"c": 3}]


def test_lines_damaged_by_the_old_appends_are_skipped_and_reported(tmp_path):
    """Before, the next record was appended to the cut-off line: that joined line is unreadable."""
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": {"a": 2}\n\xff\xfe\n{"c": 3}\n')
    with pytest.warns(DamagedLines, match=r"line\(s\) 2, 3"):
        assert read_jsonl(path) == [{"a": 1}, {"c": 3}]
    assert read_jsonl(tmp_path / "absent.jsonl") == []


def test_lifelong_points_survive_a_cut_off_last_line(tmp_path):
    from factedit.evaluate.lifelong import LifelongPoint
    from factedit.evaluate.sequential import POINTS_FILE, _append_point, read_points

    def point(batch):
        return LifelongPoint(batch, batch * 2, 0.5 if batch else None, 20.0 + batch, None, 0, {"w": 1.0 + batch})

    _append_point(tmp_path, point(0))
    _append_point(tmp_path, point(1))
    path = tmp_path / POINTS_FILE
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.warns(DamagedLines):
        assert read_points(tmp_path) == {0: point(0)}  # batch 1 is measured again on resuming
    with pytest.warns(DamagedLines):
        _append_point(tmp_path, point(1))
    _append_point(tmp_path, point(2))
    assert read_points(tmp_path) == {0: point(0), 1: point(1), 2: point(2)}
    path.write_text(path.read_text() + json.dumps({"not": "a point"}) + "\n")
    assert set(read_points(tmp_path)) == {0, 1, 2}


def test_trace_avg_resumes_after_a_cut_off_fact(tiny_llama, tmp_path, monkeypatch):
    from factedit.data.known import KnownFact
    from factedit.trace import average as average_module
    from factedit.trace.average import average_effects
    from factedit.trace.runs import prepare

    prompt = "Michael Jordan plays basketball professionally in the city of"
    answer = prepare(tiny_llama, prompt, "Michael Jordan", samples=1).answer.strip()
    facts = [KnownFact(0, "Michael Jordan", answer, prompt),
             KnownFact(1, "Michael Jordan", "Rome" if answer != "Rome" else "Paris", prompt)]
    first = average_effects(tiny_llama, facts, "hidden", samples=1, noise=1.0, out_dir=tmp_path)
    log = tmp_path / "facts.jsonl"
    log.write_bytes(log.read_bytes()[:-10])  # the second fact's line, cut off by a kill
    traced, original = [], average_module.fact_record
    monkeypatch.setattr(average_module, "fact_record", lambda lm, fact, *a, **k: traced.append(fact.known_id)
                        or original(lm, fact, *a, **k))
    with pytest.warns(DamagedLines):
        again = average_effects(tiny_llama, facts, "hidden", samples=1, noise=1.0, out_dir=tmp_path)
    assert traced == [1] and again.to_dict() == first.to_dict()
    assert [r["known_id"] for r in read_jsonl(log)] == [0, 1]
