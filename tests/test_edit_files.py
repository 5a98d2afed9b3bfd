"""Edit files are validated in one place when read, and again against the model when applied; the CLI
refuses bad ones in one line, and `edit --save` never loses a computed edit to an unwritable path."""

import errno
import json
import tempfile

import pytest
import torch
from bad_edits import BAD_EDIT_FILES, MISFIT_EDIT_FILES, MODULE, factors, write_edit_file
from click.testing import CliRunner
from tiny import tiny_model, word_tokenizer

from factedit.cli import main
from factedit.edit import EditDelta, EditFileError, EditStack


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def state(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def unchanged(lm, before) -> bool:
    return all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


def test_a_valid_hand_written_file_loads_and_applies(tiny_llama, tmp_path):
    path = write_edit_file(tmp_path / "ok.safetensors", tiny_llama.fingerprint)
    delta = EditDelta.load(path)
    assert delta.requests[0]["subject"] == "The Eiffel Tower" and delta.settings == {"layer": 1}
    before = state(tiny_llama)
    EditStack(tiny_llama).apply(delta)
    assert not unchanged(tiny_llama, before)


@pytest.mark.parametrize("case", sorted(BAD_EDIT_FILES))
def test_malformed_files_are_refused_on_load(case, tiny_llama, tmp_path):
    tensors, metadata, message = BAD_EDIT_FILES[case]
    path = write_edit_file(tmp_path / "bad.safetensors", tiny_llama.fingerprint, tensors, **metadata)
    with pytest.raises(EditFileError) as refused:
        EditDelta.load(path)
    assert message in str(refused.value) and str(path) in str(refused.value)


@pytest.mark.parametrize("case", sorted(MISFIT_EDIT_FILES))
def test_files_that_do_not_fit_the_model_are_refused_on_apply(case, tiny_llama, tmp_path):
    tensors, message = MISFIT_EDIT_FILES[case]
    delta = EditDelta.load(write_edit_file(tmp_path / "misfit.safetensors", tiny_llama.fingerprint, tensors))
    before, stack = state(tiny_llama), EditStack(tiny_llama)
    with pytest.raises(EditFileError, match=message):
        stack.apply(delta)
    assert unchanged(tiny_llama, before) and not stack.applied


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_edits_are_refused_on_apply(value, tiny_llama):
    """An edit made in memory (not read from a file) is checked too: a diverged optimisation must not
    silently turn the model's weights into NaN."""
    tensors = factors()
    tensors[f"{MODULE}::down"][0, 5] = value
    delta = EditDelta("rome", tiny_llama.fingerprint, {MODULE: {"up": tensors[f"{MODULE}::up"],
                                                                "down": tensors[f"{MODULE}::down"]}})
    before, stack = state(tiny_llama), EditStack(tiny_llama)
    with pytest.raises(EditFileError, match="NaN or infinite"):
        stack.apply(delta)
    assert unchanged(tiny_llama, before) and not stack.applied


def test_an_edit_that_overflows_half_precision_weights_is_refused(tiny_llama, monkeypatch):
    from factedit.edit import delta as delta_module

    monkeypatch.setattr(delta_module, "MAX_RELATIVE_CHANGE", float("inf"))  # the overflow check behind the bound
    tiny_llama.model.half()
    before, stack = state(tiny_llama), EditStack(tiny_llama)
    huge = EditDelta("ft", tiny_llama.fingerprint, {MODULE: {"dense": torch.full((32, 48), 1e6)}})  # finite in float32
    with pytest.raises(EditFileError, match="infinite or NaN in float16"):
        stack.apply(huge)
    assert unchanged(tiny_llama, before) and not stack.applied


def test_an_edit_that_makes_predictions_uniform_is_refused_and_reverted_when_probed(tiny_llama):
    """Within the size bound, an edit can still break the model: setting the unembedding to one row for
    every token makes every prediction equally likely. Applied with probe=True (edit files from
    elsewhere), it is refused and the model is as it was."""
    weight = tiny_llama.model.lm_head.weight.detach().float()
    flat = EditDelta("ft", tiny_llama.fingerprint, {"lm_head": {"dense": weight.mean(0, keepdim=True) - weight}})
    before, stack = state(tiny_llama), EditStack(tiny_llama)
    stack.apply(factor_delta(tiny_llama), probe=True)  # a sound edit passes the probe
    after_sound = state(tiny_llama)
    with pytest.raises(EditFileError, match="every token as equally likely"):
        stack.apply(flat, probe=True)
    assert unchanged(tiny_llama, after_sound) and len(stack.applied) == 1
    stack.revert()
    assert unchanged(tiny_llama, before)


def factor_delta(lm) -> EditDelta:
    tensors = factors()
    return EditDelta("rome", lm.fingerprint, {MODULE: {"up": tensors[f"{MODULE}::up"], "down": tensors[f"{MODULE}::down"]}})


def test_saving_is_atomic(tiny_llama, tmp_path, monkeypatch):
    import factedit.edit.delta as delta_module

    path = write_edit_file(tmp_path / "edit.safetensors", tiny_llama.fingerprint)
    original = path.read_bytes()
    delta = EditDelta.load(path)

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(delta_module, "save_file", interrupted)
    with pytest.raises(OSError, match="No space"):
        delta.save(path)
    assert path.read_bytes() == original and [p.name for p in tmp_path.iterdir()] == ["edit.safetensors"]


# ------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("case", ["nan", "mismatched rank", "1-D tensor", "requests not a list",
                                  "settings not an object", "newer format version", "integer tensor"])
def test_cli_refuses_a_bad_edit_file_in_one_line(case, tiny_folder, tmp_path):
    from factedit.models import load

    tensors, metadata, message = BAD_EDIT_FILES[case]
    path = write_edit_file(tmp_path / "bad.safetensors", load(str(tiny_folder)).fingerprint, tensors, **metadata)
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_folder), "--edits", str(path),
                                       "--prompt", "The Eiffel Tower is located in the city of", "--max-new", "2"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output and "applied" not in result.output


def test_cli_refuses_an_edit_file_that_breaks_the_model(tiny_folder, tmp_path):
    """A file of the right shapes and size whose edit makes every prediction equally likely."""
    from factedit.models import load

    lm = load(str(tiny_folder))
    weight = lm.model.lm_head.weight.detach().float()
    path = write_edit_file(tmp_path / "flat.safetensors", lm.fingerprint,
                           {"lm_head::dense": (weight.mean(0, keepdim=True) - weight).contiguous()})
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_folder), "--edits", str(path), "--prompt", "The"])
    assert result.exit_code == 2 and "every token as equally likely" in result.output, result.output
    assert "Traceback" not in result.output


def test_cli_refuses_an_edit_that_does_not_fit_the_model_in_one_line(tiny_folder, tmp_path):
    from factedit.models import load

    tensors, message = MISFIT_EDIT_FILES["wrong shape"]
    path = write_edit_file(tmp_path / "misfit.safetensors", load(str(tiny_folder)).fingerprint, tensors)
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_folder), "--edits", str(path), "--prompt", "The"])
    assert result.exit_code == 2 and f"error: {MODULE}: {message}" in result.output, result.output


EDIT_ARGS = ["--prompt", "{} is located in the city of", "--subject", "The Eiffel Tower", "--target", "Rome",
             "--true", "Paris", "--method", "ft", "--layer", "1"]


@pytest.fixture()
def count_edits(monkeypatch):
    """Counts the edits computed by the CLI (through factedit.workflows, or factedit.edit directly)."""
    import factedit.edit
    import factedit.workflows

    calls, original = [], factedit.edit.edit

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(factedit.edit, "edit", counting)
    monkeypatch.setattr(factedit.workflows, "edit", counting)
    return calls


@pytest.mark.parametrize("where", ["under a file", "under a file, deeper", "a folder"])
def test_edit_save_to_an_unwritable_path_fails_before_computing(where, tiny_folder, tmp_path, count_edits):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    save = {"under a file": tmp_path / "notes.txt" / "edit.safetensors",
            "under a file, deeper": tmp_path / "notes.txt" / "more" / "edit.safetensors",
            "a folder": tmp_path}[where]
    result = CliRunner().invoke(main, ["edit", "--model", str(tiny_folder), *EDIT_ARGS, "--save", str(save)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not count_edits
    if where == "a folder":  # click's own check of --save
        assert "is a directory" in result.output
    else:
        assert f"error: cannot save the edit to {save}: {tmp_path / 'notes.txt'} is not a folder" in result.output
        assert "loading" not in result.output  # checked before the model is even loaded


def test_edit_save_creates_missing_folders(tiny_folder, tmp_path, count_edits):
    save = tmp_path / "new" / "folders" / "edit.safetensors"
    result = CliRunner().invoke(main, ["edit", "--model", str(tiny_folder), *EDIT_ARGS, "--save", str(save)])
    assert result.exit_code == 0, result.output
    assert f"saved the edit to {save}" in result.output and EditDelta.load(save).method == "ft"
    assert len(count_edits) == 1


def test_edit_save_keeps_the_edit_when_writing_fails_after_computing(tiny_folder, tmp_path, monkeypatch):
    save = tmp_path / "edit.safetensors"
    original = EditDelta.save

    def disk_full_at_destination(self, path):
        if str(path) == str(save):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, path)

    monkeypatch.setattr(EditDelta, "save", disk_full_at_destination)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    result = CliRunner().invoke(main, ["edit", "--model", str(tiny_folder), *EDIT_ARGS, "--save", str(save)])
    assert result.exit_code == 2, result.output
    assert "p(Rome)" in result.output  # the edit was computed and shown
    line = next(line for line in result.output.splitlines() if line.startswith("error:"))
    assert f"could not save the edit to {save} (No space left on device); saved it to" in line
    kept = line.rsplit("saved it to ", 1)[1].removesuffix(" instead")
    assert kept.startswith(str(tmp_path / "tmp")) and not save.exists()
    delta = EditDelta.load(kept)
    assert delta.method == "ft" and delta.requests[0]["target_new"] == " Rome"
    assert json.dumps(delta.settings)  # the settings came along
