"""Settings are range-checked, not only type-checked (issue 27, items 4 and 10).

Every number of every method's settings has a declared range (factedit.settings.bounded), and every
fixed set of choices is declared (one_of); one checker refuses a value outside them when settings are
made in Python, from a dict or from a file, and again when an edit starts. The command line reads a
settings file before it loads the model, and --corpus, --tokens and --seed given with a file replace
its fields (said on stderr). Tiny random models throughout."""

import dataclasses
import json
import math
import types
import typing

import pytest
from click.testing import CliRunner

from factedit.cli import main
from factedit.cli.options import ModelChoice
from factedit.edit import METHODS, EditRequest, EditDelta, edit, get_method
from factedit.settings import Range, SettingsError

PROMPT, SUBJECT = "{} is located in the city of", "The Eiffel Tower"
SETTINGS_TYPES = sorted({method.settings_type for method in METHODS.values()}, key=lambda t: t.__name__)


def _scalar(annotation):
    """int or float for an annotation that holds numbers (int, float | None, list[list[int]], ...),
    else None; bool is not a number here."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType, list):
        found = [_scalar(a) for a in args]
        return next((f for f in found if f is not None), None)
    return annotation if annotation in (int, float) else None


def _depth(annotation) -> int:
    """How many lists the numbers of a field sit in: 0 for int, 1 for list[int], 2 for list[list[int]]."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        return 1 + _depth(args[0])
    if origin in (typing.Union, types.UnionType):
        return max(_depth(a) for a in args)
    return 0


def _valid(cls) -> dict:
    """Values for the fields that have no default (a layer, the layers)."""
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    return {name: {"layer": 1, "layers": [1]}[name] for name in required}


def _numeric_fields():
    for cls in SETTINGS_TYPES:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if _scalar(hints[f.name]) is not None:
                yield cls, f, hints[f.name]


def _outside(allowed: Range, kind: type) -> list:
    """Numbers just outside `allowed`, of the field's kind."""
    step = 1 if kind is int else 0.5
    values = []
    if allowed.low is not None:
        values.append(kind(allowed.low if allowed.low_open else allowed.low - step))
    if allowed.high is not None:
        values.append(kind(allowed.high if allowed.high_open else allowed.high + step))
    return values


def _inside(allowed: Range, kind: type):
    """A number inside `allowed` (ranges here are never narrower than 1 wide)."""
    low = 0 if allowed.low is None else allowed.low + (1 if allowed.low_open else 0)
    return kind(low)


def _bad_cases():
    for cls, f, annotation in _numeric_fields():
        allowed = f.metadata.get("range")
        if allowed is None:
            continue  # test_every_number_has_a_range says so
        kind, depth = _scalar(annotation), _depth(annotation)
        for number in _outside(allowed, kind):
            # a list field: the bad number first in a list (of pairs: beside a good one)
            value = [number] if depth == 1 else [[number, _inside(allowed, kind)]] if depth == 2 else number
            place = f.name + "[0]" * depth
            yield pytest.param(cls, f.name, value, place, number, id=f"{cls.__name__}.{f.name}={number}")


def test_every_number_has_a_range_and_every_choice_is_declared():
    fields = list(_numeric_fields())
    assert len(fields) > 25  # the enumeration found the settings' numbers
    missing = [f"{cls.__name__}.{f.name}" for cls, f, _ in fields if not isinstance(f.metadata.get("range"), Range)]
    assert not missing, f"numeric settings without a declared range (use factedit.settings.bounded): {missing}"
    choices = {f"{cls.__name__}.{f.name}": f.metadata.get("choices") for cls in SETTINGS_TYPES
               for f in dataclasses.fields(cls)}
    for name in ("RomeSettings.key_mode", "RomeSettings.early_stop_on", "MemitSettings.early_stop_on",
                 "AlphaEditSettings.null_space_rule", "AlphaEditSettings.l2_rule"):
        assert choices[name], name


@pytest.mark.parametrize("cls, name, value, place, number", list(_bad_cases()))
def test_a_number_out_of_range_is_refused_everywhere(cls, name, value, place, number, tmp_path):
    def refused(make, source=""):
        with pytest.raises(SettingsError) as caught:
            make()
        message = str(caught.value)
        assert f"field {place} must be " in message and repr(number) in message, message
        assert message.startswith(source) and "\n" not in message, message

    values = {**_valid(cls), name: value}
    refused(lambda: cls(**values))  # in Python
    refused(lambda: cls.from_dict(values, source="here"), "here: ")  # from a dict
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(values))
    refused(lambda: cls.load(path), f"{path}: ")  # from a file
    good = cls(**_valid(cls))
    refused(lambda: dataclasses.replace(good, **{name: value}))
    setattr(good, name, value)  # changed after it was made: refused when checked for a method
    method = next(m for m in METHODS.values() if m.settings_type is cls)
    refused(lambda: method.check_fields(good))


def test_prefix_lengths_are_pairs():
    for method in ("rome", "memit"):
        cls = get_method(method).settings_type
        for bad in ([[5]], [[5, 10, 3]], [[5, 10], []]):
            with pytest.raises(SettingsError, match=r"field prefix_lengths must hold lists of 2 numbers, but "
                                                    rf"prefix_lengths\[{len(bad) - 1}\] is"):
                cls.from_dict({**_valid(cls), "prefix_lengths": bad})
        assert cls(**_valid(cls), prefix_lengths=[]).prefix_lengths == []  # no prefixes: the plain prompt alone


@pytest.mark.parametrize("cls", [cls for cls in SETTINGS_TYPES if any(_scalar(t) is float for t in
                                                                      typing.get_type_hints(cls).values())])
def test_non_finite_numbers_are_refused_in_python(cls):
    name = next(f.name for cls_, f, t in _numeric_fields() if cls_ is cls and _depth(t) == 0 and _scalar(t) is float)
    for number in (math.nan, math.inf):
        with pytest.raises(SettingsError, match=f"field {name} must be .*, not {number}"):
            cls(**{**_valid(cls), name: number})


def test_choices_are_refused_with_what_they_allow():
    cases = [(cls, f) for cls in SETTINGS_TYPES for f in dataclasses.fields(cls) if f.metadata.get("choices")]
    assert cases
    for cls, f in cases:
        allowed = " or ".join(map(repr, f.metadata["choices"]))
        with pytest.raises(SettingsError, match=f"field {f.name} must be {allowed}, not 'bogus'"):
            cls(**{**_valid(cls), f.name: "bogus"})


def test_limits_and_presets_are_accepted(tiny_llama):
    from factedit.edit.alphaedit import AlphaEditSettings
    from factedit.edit.finetune import FinetuneSettings
    from factedit.edit.kn import KnSettings
    from factedit.edit.rome import RomeSettings

    RomeSettings(layer=0, v_steps=1, v_weight_decay=0.0, kl_factor=0.0, early_stop_loss=0.0, ridge=0.0, prefix_seed=0,
                 prefix_lengths=[], stats_tokens=1)
    AlphaEditSettings(layers=[0], preserve_weight=0.0, null_space_threshold=1e-12, l2=1e-12)
    FinetuneSettings(layer=0, linf_constraint=None, steps=1)
    KnSettings(threshold=0.0, layers=None, max_neurons=1, ig_steps=1)
    for name, method in METHODS.items():
        for preset in method.preset_names():
            method.check_settings(tiny_llama, method.settings_with(tiny_llama, 1, preset=preset))


def test_an_edit_with_a_field_changed_out_of_range_stops_before_any_work(tiny_llama, monkeypatch):
    """Before: v_steps 0 ran the edit, then failed formatting its report (the edit was lost)."""
    settings = get_method("rome").defaults(tiny_llama, 1)
    settings.v_steps = 0
    monkeypatch.setattr("factedit.edit.rome.key_statistics", lambda *a, **k: pytest.fail("the edit started"))
    with pytest.raises(SettingsError, match="field v_steps must be at least 1, not 0"):
        edit(tiny_llama, EditRequest.create(PROMPT, SUBJECT, "Rome", "Paris"), "rome", settings)


# ------------------------------------------------------------------------------------- command line
def _write(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def _commands(folder, tmp_path) -> dict[str, list[str]]:
    """The four commands that take --settings, each with a method the file is for, up to --settings."""
    model = ["--model", str(folder)]
    requests = _write(tmp_path / "requests.json", [{"prompt": PROMPT, "subject": SUBJECT, "target_new": "Rome"}])
    facts = _write(tmp_path / "known.json", [{"known_id": 0, "subject": SUBJECT, "attribute": "Paris",
                                              "prompt": "The Eiffel Tower is located in the city of"}])
    data = _write(tmp_path / "cf.json", [])
    return {
        "edit": ["edit", *model, "-p", PROMPT, "-s", SUBJECT, "-t", "Rome", "--true", "Paris", "--method", "rome"],
        "eval": ["eval", *model, "--method", "rome", "--dataset", "counterfact", "--data", data,
                 "-o", str(tmp_path / "run")],
        "history edit": ["history", "edit", *model, str(tmp_path / "h"), "-r", requests, "--method", "rome"],
        "history protect": ["history", "protect", *model, str(tmp_path / "h"), "--facts", facts],
    }


@pytest.fixture()
def loads(monkeypatch):
    """Counts the model loads of the commands; each load stops the command there (exit 2)."""
    from factedit.errors import FacteditError

    calls = []

    def load(self):
        calls.append(self.name)
        raise FacteditError("stopped at the model load")

    monkeypatch.setattr(ModelChoice, "load", load)
    return calls


@pytest.mark.parametrize("command", ["edit", "eval", "history edit", "history protect"])
def test_a_bad_settings_file_is_refused_before_the_model_loads(command, tiny_folder, tmp_path, loads):
    args = _commands(tiny_folder, tmp_path)[command]
    fields = {"layers": [1], "l2": -1.0} if command == "history protect" else {"layer": 1, "v_steps": 0}
    path = _write(tmp_path / "s.json", fields)
    result = CliRunner().invoke(main, args + ["--settings", path])
    assert result.exit_code == 2 and not loads, result.output
    bad = "l2 must be positive, not -1.0" if command == "history protect" else "v_steps must be at least 1, not 0"
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"error: {path}: ") and bad in result.stderr, result.stderr
    assert "loading" not in result.stderr and "Traceback" not in result.output
    # a method's own choice (rome's key_mode) is checked before the load too
    if command != "history protect":
        path = _write(tmp_path / "s.json", {"layer": 1, "key_mode": "original"})
        result = CliRunner().invoke(main, args + ["--settings", path])
        assert result.exit_code == 2 and not loads and "key_mode must be 'consistent'" in result.stderr, result.output


@pytest.mark.parametrize("command", ["edit", "eval", "history edit", "history protect"])
def test_options_given_with_a_settings_file_replace_its_fields_and_say_so(command, tiny_folder, tmp_path, loads):
    args = _commands(tiny_folder, tmp_path)[command]
    path = _write(tmp_path / "s.json", {"layers": [1]} if command == "history protect" else {"layer": 1})
    result = CliRunner().invoke(main, args + ["--settings", path])
    assert loads and "note:" not in result.stderr, result.stderr  # defaults left alone: the file's fields hold
    given = ["--tokens", "500", "--corpus", "words.txt"] + (["--seed", "3"] if command.endswith("edit") else [])
    result = CliRunner().invoke(main, args + ["--settings", path] + given)
    assert len(loads) == 2, result.output  # applied, then the model loads
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    expected = [f"note: --tokens 500 replaces stats_tokens 100000 of the settings file {path}",
                f"note: --corpus words.txt replaces stats_corpus None of the settings file {path}"]
    if "--seed" in given:
        expected.append(f"note: --seed 3 replaces prefix_seed 0 of the settings file {path}")
    assert sorted(notes) == sorted(expected), result.stderr


def test_an_option_given_with_a_settings_file_reaches_the_edit(tiny_folder, tmp_path, word_corpus):
    path = _write(tmp_path / "s.json", {"layer": 1, "v_steps": 2, "stats_tokens": 100_000, "prefix_lengths": [[3, 5]]})
    saved = tmp_path / "edit.safetensors"
    result = CliRunner().invoke(main, ["edit", "--model", str(tiny_folder), "-p", PROMPT, "-s", SUBJECT, "-t", "Rome",
                                       "--true", "Paris", "--settings", path, "--tokens", "400", "--seed", "2",
                                       "--save", str(saved)])
    assert result.exit_code == 0, result.output
    settings = EditDelta.load(saved).settings
    assert settings["stats_tokens"] == 400 and settings["prefix_seed"] == 2 and settings["v_steps"] == 2
    assert settings["stats_corpus"] is None  # not given: the file's (the environment's corpus then applies)
