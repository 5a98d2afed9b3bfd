"""Property-based tests (Hypothesis) of the one contract for files a user hands to factedit: edit
files, history manifests and settings files. Whatever their content, the result is either a correct
result or one user error (a FacteditError: a one-line CLI error, exit 2, or an HTTP 4xx), the model is
bit-identical to before on every refusal, and no file outside the given folder is touched.

Generated inputs start from valid files and change one or a few things (a field's type or value, a
tensor's name, shape, dtype or values, a manifest entry), as a hostile or careless user would; runs
on the tiny Llama, so each property takes seconds."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from bad_edits import MODULE, REQUEST, factors, write_edit_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import tiny_model, word_tokenizer

from factedit.edit import METHODS, EditDelta, EditHistory, EditStack
from factedit.edit.history import remove_last_batches
from factedit.edit.manifest import MANIFEST, read_manifest
from factedit.errors import FacteditError
from factedit.models import from_model

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])


@pytest.fixture(scope="module")
def lm():
    return from_model(tiny_model("llama"), word_tokenizer(), name="tiny")


def weights(lm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def unchanged(lm, before) -> bool:
    return all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


# ------------------------------------------------------------------------------------ edit files
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=12),
                         st.floats(allow_nan=True, allow_infinity=True))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=3)), max_leaves=6)


def as_json(value) -> str:
    return json.dumps(value)  # NaN and infinity become the non-standard tokens a hand-edited file may hold


metadata_changes = st.dictionaries(
    st.sampled_from(["format", "version", "method", "model_fingerprint", "settings", "requests", "info"]),
    st.one_of(st.none(), st.text(max_size=20), json_values.map(as_json),
              st.sampled_from(["1", "2", "\u00b2", "\u0661", "01", " 1", "factedit-edit", "[]", "{}"]),
              st.lists(st.fixed_dictionaries({"prompt": json_scalars, "subject": json_scalars,
                                              "target_new": json_scalars}, optional={"target_true": json_scalars,
                                                                                     "occurrence": json_scalars}),
                       max_size=2).map(as_json)),
    max_size=3)

MODULES = [MODULE, "model.layers.0.mlp.down_proj", "model.layers.9.mlp.down_proj", "lm_head", "model.embed_tokens",
           "", "::", "model.layers.1.mlp"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool, torch.uint8]


@st.composite
def edit_tensors(draw) -> dict[str, torch.Tensor]:
    """A valid rank-one change, then a few tensors replaced, renamed, reshaped, retyped or poisoned."""
    tensors = dict(factors())
    for _ in range(draw(st.integers(0, 3))):
        name = f"{draw(st.sampled_from(MODULES))}::{draw(st.sampled_from(['up', 'down', 'dense', 'keys', 'bias', '']))}"
        shape = draw(st.lists(st.sampled_from([0, 1, 2, 32, 48, 50]), min_size=1, max_size=3))
        dtype = draw(st.sampled_from(DTYPES))
        value = draw(st.sampled_from([0.0, 1e-3, 1.0, 1e4, 1e30, math.nan, math.inf, -math.inf]))
        tensor = torch.full(shape, value if dtype.is_floating_point else 1).to(dtype)
        if draw(st.booleans()):
            tensors.pop(draw(st.sampled_from(sorted(tensors))), None) if tensors else None
        tensors[name] = tensor
    return tensors


@FUZZ
@given(tensors=edit_tensors(), changes=metadata_changes)
def test_an_edit_file_is_applied_correctly_or_refused_with_the_model_unchanged(lm, tmp_path_factory, tensors, changes):
    path = tmp_path_factory.mktemp("edit") / "e.safetensors"
    try:
        write_edit_file(path, lm.fingerprint, tensors, **changes)
    except Exception:  # noqa: BLE001 - safetensors itself cannot write this; nothing to hand to factedit
        return
    before = weights(lm)
    stack = EditStack(lm)
    try:
        delta = EditDelta.load(path)
        stack.apply(delta, probe=True)
    except FacteditError as err:
        assert "\n" not in str(err) and str(err)
        assert unchanged(lm, before) and not stack.applied
        return
    # accepted: the model holds exactly W + the change, and reverts bit-exactly
    for name in delta.changes:
        weight = lm.model.get_submodule(name).weight
        expected = (before[f"{name}.weight"].float() + delta.weight_change(name)).to(weight.dtype)
        assert torch.equal(weight, expected)
    stack.revert()
    assert unchanged(lm, before)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(tensors=edit_tensors(), changes=metadata_changes)
def test_an_uploaded_edit_file_is_applied_or_answered_with_a_4xx(lm, tmp_path_factory, tensors, changes):
    from fastapi.testclient import TestClient

    from factedit.server.app import create_app
    from factedit.server.workbench import Workbench

    path = tmp_path_factory.mktemp("upload") / "e.safetensors"
    try:
        write_edit_file(path, lm.fingerprint, tensors, **changes)
    except Exception:  # noqa: BLE001 - see above
        return
    before = weights(lm)
    bench = Workbench(lm)
    with TestClient(create_app(bench)) as client:
        answer = client.post("/api/edits/upload", files={"file": ("e.safetensors", path.read_bytes())})
        assert answer.status_code in (200, 400), answer.text
        if answer.status_code == 400:
            assert unchanged(lm, before) and not bench.edits
        else:
            client.delete(f"/api/edits/{answer.json()['applied']['id']}")
    assert unchanged(lm, before)


# ------------------------------------------------------------------------------------- manifests
@pytest.fixture(scope="module")
def saved_history(lm, tmp_path_factory) -> Path:
    """Two batches saved by the code itself, to copy and then spoil."""
    folder = tmp_path_factory.mktemp("saved") / "history"
    history = EditHistory(lm, folder)
    for scale in (1.0, 2.0):
        parts = factors()
        history.apply(EditDelta("rome", lm.fingerprint, {MODULE: {"up": scale * parts[f"{MODULE}::up"],
                                                                  "down": parts[f"{MODULE}::down"]}},
                                requests=[REQUEST]))
    history.release()
    return folder


FILE_NAMES = st.sampled_from(["batch_00000.safetensors", "batch_00001.safetensors", "batch_00002.safetensors",
                              "../outside.txt", "OUTSIDE", "history.json", "history.lock", ".", "", "batch_0.safetensors",
                              "batch_\u0661\u0661\u0661\u0661\u0661.safetensors", "sub/batch_00000.safetensors"])
entry_values = st.one_of(FILE_NAMES, json_scalars, st.integers(-1, 3), st.just("0" * 64), st.just("g" * 64))


@st.composite
def manifest_changes(draw, valid: dict):
    """The valid manifest with a few fields or batch entries replaced, removed, duplicated or reordered."""
    data = json.loads(json.dumps(valid))
    for _ in range(draw(st.integers(1, 4))):
        what = draw(st.sampled_from(["top", "entry", "rename", "rename", "drop", "duplicate", "reverse", "v1", "raw"]))
        if what == "rename" and isinstance(data.get("batches"), list) and data["batches"]:
            position = draw(st.integers(0, len(data["batches"]) - 1))
            if isinstance(data["batches"][position], dict):
                data["batches"][position]["file"] = draw(FILE_NAMES)
            else:
                data["batches"][position] = draw(FILE_NAMES)
        elif what == "top":
            data[draw(st.sampled_from(["format", "version", "model", "model_fingerprint", "batches"]))] = \
                draw(st.one_of(json_values, st.just([5])))
        elif what == "entry" and isinstance(data.get("batches"), list) and data["batches"]:
            entry = draw(st.sampled_from(data["batches"]))
            if isinstance(entry, dict):
                entry[draw(st.sampled_from(["file", "index", "sha256", "extra"]))] = draw(entry_values)
        elif what == "drop" and isinstance(data.get("batches"), list) and data["batches"]:
            data["batches"].pop(draw(st.integers(0, len(data["batches"]) - 1)))
        elif what == "duplicate" and isinstance(data.get("batches"), list) and data["batches"]:
            data["batches"].append(data["batches"][0])
        elif what == "reverse" and isinstance(data.get("batches"), list):
            data["batches"].reverse()
        elif what == "v1" and isinstance(data.get("batches"), list):
            data["version"] = 1
            data["batches"] = [e.get("file") if isinstance(e, dict) else e for e in data["batches"]]
        elif what == "raw":
            return draw(st.binary(max_size=60))
    return json.dumps(data).encode()


@pytest.mark.filterwarnings("ignore::factedit.edit.manifest.HistoryWarning")  # a dropped entry leaves a stray file
@FUZZ
@given(data=st.data())
def test_a_spoiled_manifest_is_replayed_correctly_or_refused_and_nothing_outside_is_touched(lm, saved_history,
                                                                                          tmp_path_factory, data):
    root = tmp_path_factory.mktemp("spoiled")
    folder = root / "history"
    shutil.copytree(saved_history, folder)
    outside = root / "outside.txt"
    outside.write_text("keep me")
    valid = json.loads((folder / MANIFEST).read_text())
    content = data.draw(manifest_changes(valid)).replace(b"OUTSIDE", str(outside).encode())
    (folder / MANIFEST).write_bytes(content)
    files_before = {p.name: p.read_bytes() for p in folder.iterdir()}

    before = weights(lm)
    try:
        history = EditHistory.load(lm, folder)
    except FacteditError as err:
        assert str(err) and unchanged(lm, before)
    else:  # replayed: only a prefix of the saved batches, exactly as saved
        assert len(history) <= 2
        history.release()
        assert unchanged(lm, before)
    try:
        removed = remove_last_batches(folder, 1)
    except FacteditError:
        assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "history.lock"} == \
            {k: v for k, v in files_before.items() if k != "history.lock"}
    else:
        assert len(removed) == 1 and not (folder / removed[0]).exists()
        assert all((folder / name).exists() for name in files_before if name not in removed)
        read_manifest(folder)  # still a readable history
    assert outside.read_text() == "keep me" and sorted(p.name for p in root.iterdir()) == ["history", "outside.txt"]


# -------------------------------------------------------------------------------------- settings
@st.composite
def settings_files(draw):
    """A method's default settings as saved, with a few fields given other values or types."""
    name = draw(st.sampled_from(sorted(m for m in METHODS if m != "none")))
    spec = METHODS[name]
    lm = from_model(tiny_model("llama"), word_tokenizer(), name="tiny")
    data = spec.defaults(lm, 1).to_dict()
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(data) + ["unknown_field"]))
        data[key] = draw(st.one_of(json_values, st.integers(-3, 3), st.floats(-2, 2), st.just([[0, 5]]),
                                   st.just([]), st.sampled_from(["nll", "total", "consistent", "original"])))
    if draw(st.booleans()):
        data.pop(draw(st.sampled_from(sorted(data))))
    return spec, data


@FUZZ
@given(case=settings_files())
def test_a_settings_file_is_read_with_every_range_held_or_refused_in_one_line(tmp_path_factory, case):
    from factedit.settings import check_settings_values

    spec, data = case
    path = tmp_path_factory.mktemp("settings") / "s.json"
    path.write_text(json.dumps(data))
    try:
        settings = spec.read_settings(path)
    except FacteditError as err:
        assert "\n" not in str(err) and str(path) in str(err)
        return
    check_settings_values(settings)  # accepted settings hold every declared range
    spec.check_fields(settings)
