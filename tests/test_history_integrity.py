"""A history folder cannot lose a batch or be turned against its user: concurrent writers are
serialised or refused, the manifest names only the code's own batch files (nothing outside the
folder is read or deleted), reordered, swapped or altered batches are refused, malformed manifests
are one-line errors, and a batch file left by an interrupted write is ignored and reported."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bad_edits import MODULE, factors
from click.testing import CliRunner
from tiny import saved_folder, tiny_model, word_tokenizer

from factedit.cli import main
from factedit.edit import EditDelta, EditHistory, HistoryError
from factedit.edit.manifest import MANIFEST, HistoryWarning, read_manifest
from factedit.folder_lock import FolderBusyError, FolderLock
from factedit.models import from_model

REQUEST = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome",
           "target_true": "Paris"}


@pytest.fixture()
def lm():
    return from_model(tiny_model("llama"), word_tokenizer(), name="tiny")


def batch(lm, scale: float) -> EditDelta:
    """A rank-one change of the tiny Llama's layer-1 MLP (no optimisation: the folder is what is tested)."""
    parts = factors()
    return EditDelta("rome", lm.fingerprint, {MODULE: {"up": scale * parts[f"{MODULE}::up"],
                                                       "down": parts[f"{MODULE}::down"]}},
                     requests=[{**REQUEST, "target_new": f"Rome {scale}"}])


def state(lm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def same(lm, expected) -> bool:
    return all(torch.equal(expected[k], v) for k, v in lm.model.state_dict().items())


@pytest.fixture()
def folder(lm, tmp_path) -> Path:
    """A history of three batches, saved; the model released."""
    path = tmp_path / "history"
    history = EditHistory(lm, path)
    for scale in (1.0, 2.0, 3.0):
        history.apply(batch(lm, scale))
    history.release()
    return path


def rewrite_manifest(folder: Path, change) -> None:
    data = json.loads((folder / MANIFEST).read_text())
    change(data)
    (folder / MANIFEST).write_text(json.dumps(data))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---------------------------------------------------------------------------------- one writer
def test_a_second_writer_in_this_process_is_refused_and_nothing_is_lost(lm, folder):
    """Two histories opened on one folder both replay three batches and both edit: the first to save
    holds the folder; the second is refused, also once the first has let go (the folder changed)."""
    first, second = EditHistory.load(lm, folder), EditHistory.load(copy_of(lm), folder)
    first.apply(batch(lm, 4.0))
    with pytest.raises(FolderBusyError, match="in use by another process"):
        second.apply(batch(second.lm, 5.0))
    first.release()
    with pytest.raises(HistoryError, match="changed by another process since this history read it"):
        second.apply(batch(second.lm, 5.0))
    second.release()
    manifest = read_manifest(folder)
    assert len(manifest.batches) == 4
    assert EditDelta.load(folder / manifest.batches[-1].file).requests[0]["target_new"] == "Rome 4.0"


def copy_of(lm):
    return from_model(tiny_model("llama"), word_tokenizer(), name="tiny")


def test_a_locked_folder_is_refused_by_the_command_line_before_any_work(folder, tmp_path):
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([REQUEST]))
    model = saved_folder("llama", tmp_path / "model")
    with FolderLock(folder, "history.lock", "history folder"):
        edited = run("history", "edit", folder, "--model", model, "-r", requests, "--method", "ft", "--layer", 1)
        reverted = run("history", "revert", folder)
    for result in (edited, reverted):
        assert result.exit_code == 2, result.output
        assert "is in use by another process" in result.output and "Traceback" not in result.output
    assert "editing" not in edited.output  # refused before computing anything
    assert len(read_manifest(folder).batches) == 3


@pytest.mark.slow  # two editing subprocesses: about 10 s
def test_two_history_edit_processes_on_one_folder_keep_both_batches_or_refuse_one(tmp_path):
    """Two `factedit history edit` processes started together on one folder: each either saves its
    batch (and the folder then holds it) or is refused with a message; never do both report saving
    while one batch is lost (what happened before the lock: both saved batch_00000)."""
    model = saved_folder("llama", tmp_path / "model")
    settings = tmp_path / "ft.json"  # enough steps that the edits overlap in time
    settings.write_text(json.dumps({"layer": 1, "steps": 400}))
    folder = tmp_path / "history"
    commands = []
    for name in ("Rome", "Seattle"):
        requests = tmp_path / f"{name}.json"
        requests.write_text(json.dumps([{**REQUEST, "target_new": name}]))
        commands.append([sys.executable, "-c", "from factedit.cli import main; main()", "history", "edit", str(folder),
                         "--model", str(model), "-r", str(requests), "--method", "ft", "--settings", str(settings),
                         "--threads", "1"])
    env = {**os.environ, "FACTEDIT_CACHE_DIR": str(tmp_path / "cache")}
    processes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for c in commands]
    outcomes = [(p.wait(timeout=300), *p.communicate()) for p in processes]
    saved = []
    for (code, out, err), name in zip(outcomes, ("Rome", "Seattle")):
        assert code in (0, 2), err
        if code == 0:
            saved.append(name)
        else:
            assert "is in use by another process" in err or "changed by another process" in err, err
    assert saved, "neither process saved its batch"
    manifest = read_manifest(folder)
    kept = [EditDelta.load(folder / entry.file).requests[0]["target_new"].strip() for entry in manifest.batches]
    assert sorted(kept) == sorted(saved), (kept, saved, outcomes)


# ----------------------------------------------------------------------- names, order, contents
@pytest.mark.parametrize("name", ["../victim.txt", "ABSOLUTE", "batch_00001.safetensors", "history.json"])
def test_a_manifest_naming_another_file_is_refused_and_nothing_is_deleted(lm, folder, tmp_path, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    name = str(victim) if name == "ABSOLUTE" else name

    def point_last_at(data):
        data["batches"][-1]["file"] = name

    rewrite_manifest(folder, point_last_at)
    before = sorted(p.name for p in folder.iterdir())
    for command in (["history", "revert", folder], ["history", "show", folder]):
        result = run(*command)
        assert result.exit_code == 2 and "refusing the manifest" in result.output, result.output
    with pytest.raises(HistoryError, match="refusing the manifest"):
        EditHistory.load(lm, folder)
    assert victim.read_text() == "keep me" and sorted(p.name for p in folder.iterdir()) == before


def test_a_version_1_manifest_naming_a_file_outside_is_refused(folder, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    rewrite_manifest(folder, lambda data: data.update(version=1, batches=["batch_00000.safetensors",
                                                                          "../victim.txt"]))
    result = run("history", "revert", folder)
    assert result.exit_code == 2 and "refusing the manifest" in result.output
    assert victim.read_text() == "keep me"


def test_a_batch_that_is_a_symbolic_link_is_refused(folder, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / "batch_00002.safetensors", outside)
    (folder / "batch_00002.safetensors").unlink()
    (folder / "batch_00002.safetensors").symlink_to(outside)
    result = run("history", "revert", folder)
    assert result.exit_code == 2 and "symbolic link" in result.output
    assert outside.exists()


def test_reordered_duplicated_swapped_or_altered_batches_are_refused(lm, folder):
    original = (folder / MANIFEST).read_text()
    unedited = state(lm)

    def refused(match):
        with pytest.raises(HistoryError, match=match):
            EditHistory.load(lm, folder)
        assert same(lm, unedited)
        (folder / MANIFEST).write_text(original)

    rewrite_manifest(folder, lambda data: data["batches"].reverse())  # reordered
    refused("listed in order")
    rewrite_manifest(folder, lambda data: data["batches"].__setitem__(1, data["batches"][0]))  # duplicated
    refused("listed in order")

    a, b = folder / "batch_00000.safetensors", folder / "batch_00001.safetensors"
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes), b.write_bytes(a_bytes)  # swapped on disk
    refused("SHA-256 differs")

    def swap_the_hashes_too(data):  # a manifest rewritten to match: the files still know their place
        data["batches"][0]["sha256"], data["batches"][1]["sha256"] = (data["batches"][1]["sha256"],
                                                                      data["batches"][0]["sha256"])

    rewrite_manifest(folder, swap_the_hashes_too)
    refused("saved as batch 1 of a history, not batch 0")
    a.write_bytes(a_bytes), b.write_bytes(b_bytes)

    other = batch(lm, 7.0)
    other.save(folder / "batch_00002.safetensors")  # replaced by another valid edit file
    refused("SHA-256 differs")


def test_a_version_1_manifest_still_replays_and_gains_hashes_when_written(lm, folder):
    expected = EditHistory.load(lm, folder)
    weights = state(lm)
    expected.release()
    rewrite_manifest(folder, lambda data: data.update(version=1, batches=[e["file"] for e in data["batches"]]))
    history = EditHistory.load(lm, folder)
    assert same(lm, weights)
    history.revert()
    data = json.loads((folder / MANIFEST).read_text())
    assert data["version"] == 2 and [e["index"] for e in data["batches"]] == [0, 1]
    assert all(len(e["sha256"]) == 64 for e in data["batches"])
    history.release()


@pytest.mark.parametrize("content, message", [
    (b'{"format": "factedit-history", "version": 2, "model": "m", "model_fingerprint": "f", "batches": [5]}',
     "must be an object with the fields file, index and sha256"),
    (b'{"format": "factedit-history", "version": 1, "model": "m", "model_fingerprint": "f", "batches": [5]}',
     "the file name must be a string, not a number"),
    (b'{"format": "factedit-history", "version": 2, "model": "m", "model_fingerprint": "f", "batches": {}}',
     "'batches' must be a list"),
    (b'{"format": "factedit-history", "version": 2, "model": 3, "model_fingerprint": "f", "batches": []}',
     "'model' must be a non-empty string"),
    (b'{"format": "factedit-history", "version": 9, "model": "m", "model_fingerprint": "f", "batches": []}',
     "manifest version 9 is not supported"),
    (b'{"format": "factedit-history", "version": 2, "model": "m", "model_fingerprint": "f", "batches": '
     b'[{"file": "batch_00000.safetensors", "index": 0, "sha256": "xyz"}]}', "64 lowercase hexadecimal"),
    (b'\xff\xfe{"format": \x80}', "not a readable history manifest"),
    (b'[1, 2]', "not a factedit history manifest"),
])
def test_malformed_manifests_are_one_line_errors(tmp_path, content, message):
    folder = tmp_path / "history"
    folder.mkdir()
    (folder / MANIFEST).write_bytes(content)
    for command in (["history", "show", folder], ["history", "revert", folder]):
        result = run(*command)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output, result.output


# ------------------------------------------------------------------------------ interrupted writes
def test_a_batch_file_left_by_an_interrupted_first_write_is_ignored_and_reported(lm, tmp_path):
    """A kill between the first batch's file and the first manifest: the folder is a new history
    with debris, not a folder refused forever."""
    folder = tmp_path / "history"
    folder.mkdir()
    batch(lm, 1.0).save(folder / "batch_00000.safetensors")
    with pytest.warns(HistoryWarning, match="ignoring batch_00000.safetensors"):
        history = EditHistory(lm, folder)
    assert history.ignored == ["batch_00000.safetensors"] and history.pending == 0
    history.apply(batch(lm, 2.0))  # replaces the debris
    history.release()
    assert EditDelta.load(folder / "batch_00000.safetensors").requests[0]["target_new"] == "Rome 2.0"
    assert not EditHistory(lm, folder).ignored


def test_a_later_unnamed_batch_is_ignored_by_the_command_line_and_said_so(lm, folder):
    batch(lm, 9.0).save(folder / "batch_00003.safetensors")  # written, but the manifest was not
    shown = run("history", "show", folder)
    assert shown.exit_code == 0 and "3 batch(es)" in shown.output
    assert "ignoring batch_00003.safetensors" in shown.output
    with pytest.warns(HistoryWarning):
        history = EditHistory.load(lm, folder)
    assert len(history) == 3
    history.release()


def test_other_edit_files_without_a_manifest_are_not_taken_for_a_history(lm, tmp_path):
    folder = tmp_path / "edits"
    folder.mkdir()
    batch(lm, 1.0).save(folder / "eiffel.safetensors")
    with pytest.raises(HistoryError, match="not a history folder"):
        EditHistory(lm, folder)


def test_a_killed_writer_leaves_the_folder_usable(folder, tmp_path):
    """The lock is the kernel's: a process killed while holding it does not leave the folder locked."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from factedit.folder_lock import FolderLock; "
                               f"lock = FolderLock({str(folder)!r}, 'history.lock'); lock.acquire(); print('locked', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(FolderBusyError, match=f"process {holder.pid}"):
        FolderLock(folder, "history.lock", "history folder").acquire()
    holder.kill()
    holder.wait()
    result = run("history", "revert", folder)
    assert result.exit_code == 0 and "2 batch(es) left" in result.output
