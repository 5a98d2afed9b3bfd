"""JSON round-trip for the typed settings dataclasses of every method.

Values read from JSON are checked against the dataclass's field annotations (int, float, str, bool,
`X | None`, `list[...]`, nested lists) when they are loaded, so that a wrong type is refused with a
message naming the field instead of failing deep inside an editor. Ranges and choices are declared
per field (`bounded`, `one_of`) and checked by one checker whenever settings are made: from a file,
from a dict or in Python (JsonSettings.__post_init__), so that a value no editor can use (0 value
steps, a negative learning rate) is refused before any work, not after it."""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from .errors import InputError, json_type


class SettingsError(InputError):
    """Settings (a settings file, a preset name, a field value) that do not fit the method. An
    InputError: a setting out of its range is a bad argument like any other."""


@dataclass(frozen=True)
class Range:
    """The numbers a setting allows: at least `low` (above it when `low_open`) and at most `high`
    (below it when `high_open`); None: no bound on that side. Never NaN or infinite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.low == 0 and self.high is None:
            return "positive" if self.low_open else "zero or positive"
        parts = [] if self.low is None else [f"{'above' if self.low_open else 'at least'} {self.low:g}"]
        if self.high is not None:
            parts.append(f"{'below' if self.high_open else 'at most'} {self.high:g}")
        return " and ".join(parts) or "finite"


def bounded(default=MISSING, *, at_least: float | None = None, above: float | None = None,
            at_most: float | None = None, below: float | None = None, default_factory=MISSING,
            item_length: int | None = None):
    """A dataclass field whose number (or every number in its lists) must lie in the given range;
    `item_length`: a list of lists whose every item has that many numbers (e.g. [tokens, count])."""
    if at_least is not None and above is not None or at_most is not None and below is not None:
        raise ValueError("give at most one lower and one upper bound")
    allowed = Range(above if above is not None else at_least, below if below is not None else at_most,
                    low_open=above is not None, high_open=below is not None)
    return field(default=default, default_factory=default_factory,
                 metadata={"range": allowed, "item_length": item_length})


def one_of(default, choices: tuple[str, ...]):
    """A dataclass field that takes one of `choices`."""
    return field(default=default, metadata={"choices": tuple(choices)})


def check_values(cls, values: dict, source: str | Path | None = None) -> None:
    """A SettingsError naming the field, the value and what it allows if one of `values` (field name:
    value, of the settings dataclass `cls`) is outside its declared range or choices. Values of
    another type are left to the type check (JsonSettings.from_dict)."""
    where = f"{source}: " if source is not None else ""
    for f in fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        choices = f.metadata.get("choices")
        if choices is not None and isinstance(value, str) and value not in choices:
            raise SettingsError(f"{where}{cls.__name__} field {f.name} must be {' or '.join(map(repr, choices))}, "
                                f"not {value!r}")
        allowed, length = f.metadata.get("range"), f.metadata.get("item_length")
        if allowed is None:
            continue
        if length is not None and isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, list) and len(item) != length:
                    raise SettingsError(f"{where}{cls.__name__} field {f.name} must hold lists of {length} numbers, "
                                        f"but {f.name}[{i}] is {item!r}")
        for place, number in _numbers(value, f.name):
            if number not in allowed:
                raise SettingsError(f"{where}{cls.__name__} field {place} must be {allowed}, not {number!r}")


def _numbers(value, place: str):
    """(place, number) for `value` if it is a number, or for every number inside its (nested) lists."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{place}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield place, value


def check_settings_values(settings, source: str | Path | None = None) -> None:
    """check_values on every field of the settings dataclass instance `settings` (e.g. one changed
    after it was made)."""
    check_values(type(settings), {f.name: getattr(settings, f.name) for f in fields(settings)}, source)


class JsonSettings:
    """Mixin for dataclasses: to_dict / from_dict (unknown keys refused, types checked) / save / load."""

    def __post_init__(self) -> None:
        # Every way of making settings (a file, a dict, Python, dataclasses.replace) passes here.
        check_settings_values(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str | Path | None = None):
        """The settings in `data`, checked: an object, known fields only, required fields present,
        every value of its field's type (an integer is accepted for a float field and converted).
        `source` (e.g. the file) prefixes the messages."""
        where = f"{source}: " if source is not None else ""
        name = cls.__name__
        if not isinstance(data, dict):
            raise SettingsError(f"{where}settings must be a JSON object of {name} fields, not {json_type(data)}")
        known = {f.name: f for f in fields(cls)}
        unknown = [key for key in data if key not in known]
        if unknown:
            raise SettingsError(f"{where}unknown {name} fields: {', '.join(sorted(map(str, unknown)))} "
                                f"(known fields: {', '.join(known) or 'none'})")
        missing = [f.name for f in known.values()
                   if f.name not in data and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise SettingsError(f"{where}{name} needs the field(s) {', '.join(missing)}")
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in data.items():
            annotation = hints.get(key, typing.Any)
            mismatch = _mismatch(value, annotation, key)
            if mismatch is not None:
                place, found = mismatch
                expected = describe_type(annotation)
                detail = f"not {json_type(found)} ({found!r})" if place == key else \
                    f"but {place} is {json_type(found)} ({found!r})"
                raise SettingsError(f"{where}{name} field {key!r} must be {expected}, {detail}")
            values[key] = _as_declared(value, annotation)
        try:
            return cls(**values)
        except SettingsError as err:  # out of range (__post_init__): say where it came from
            raise SettingsError(f"{where}{err}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path):
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise SettingsError(f"cannot read the settings file {path}: {getattr(err, 'strerror', None) or err}"
                                ) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SettingsError(f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(data, source=path)


_NAMES = {int: ("an integer", "integers"), float: ("a finite number", "finite numbers"), str: ("a string", "strings"),
          bool: ("a boolean (true or false)", "booleans"), type(None): ("null", "nulls")}


def describe_type(annotation, plural: bool = False) -> str:
    """"an integer", "an integer or null", "a list of lists of integers", ... for error messages."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a, plural) for a in args)
    if origin is list:
        inner = describe_type(args[0], plural=True) if args else "values"
        return f"lists of {inner}" if plural else f"a list of {inner}"
    if origin is dict:
        return "objects" if plural else "an object"
    if annotation in _NAMES:
        return _NAMES[annotation][plural]
    return getattr(annotation, "__name__", str(annotation))


def _mismatch(value, annotation, place: str) -> tuple[str, object] | None:
    """None if `value` fits `annotation`; else where it does not (e.g. "prefix_lengths[0][1]") and the
    offending value. bool is not accepted as an int (JSON true is not 1); int is accepted as float."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if any(_mismatch(value, option, place) is None for option in args):
            return None
        for option in args:  # point inside a list that almost fits rather than at the whole list
            if typing.get_origin(option) is list and isinstance(value, list):
                return _mismatch(value, option, place)
        return place, value
    if origin is list:
        if not isinstance(value, list):
            return place, value
        item = args[0] if args else typing.Any
        for i, element in enumerate(value):
            inner = _mismatch(element, item, f"{place}[{i}]")
            if inner is not None:
                return inner
        return None
    if origin is dict:
        return None if isinstance(value, dict) else (place, value)
    if annotation is typing.Any:
        return None
    if annotation is type(None):
        ok = value is None
    elif annotation is bool:
        ok = isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif isinstance(annotation, type):
        ok = isinstance(value, annotation)
    else:  # an annotation this checker does not know: leave it to the dataclass
        ok = True
    return None if ok else (place, value)


def _as_declared(value, annotation):
    """An integer given for a float field becomes a float (JSON writes 1.0 as 1 only by hand)."""
    floats = annotation is float or (typing.get_origin(annotation) in (typing.Union, types.UnionType)
                                     and float in typing.get_args(annotation))
    if floats and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
