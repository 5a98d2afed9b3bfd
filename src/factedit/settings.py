"""JSON round-trip for the typed settings dataclasses of every method.

Values read from JSON are checked against the dataclass's field annotations (int, float, str, bool,
`X | None`, `list[...]`, nested lists) when they are loaded, so that a wrong type is refused with a
message naming the field instead of failing deep inside an editor."""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import MISSING, asdict, fields
from pathlib import Path

from .errors import FacteditError, json_type


class SettingsError(FacteditError, ValueError):
    """Settings (a settings file, a preset name, a field value) that do not fit the method."""


class JsonSettings:
    """Mixin for dataclasses: to_dict / from_dict (unknown keys refused, types checked) / save / load."""

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
        return cls(**values)

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
