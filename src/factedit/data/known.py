"""The ROME paper's "known facts" (known_1000.json): prompts whose answer the model should know."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import FacteditError, InputError, json_type

KNOWN_FACTS_URL = "https://rome.baulab.info/data/dsets/known_1000.json"
REQUIRED = ("known_id", "subject", "attribute", "prompt")


class DatasetError(FacteditError, ValueError):
    """A dataset file that is missing or does not have the expected schema."""


@dataclass(frozen=True)
class KnownFact:
    known_id: int
    subject: str
    attribute: str
    prompt: str
    relation_id: str = ""


def data_dir() -> Path | None:
    value = os.environ.get("FACTEDIT_DATA_DIR")
    return Path(value) if value else None


def _resolve(path: str | Path | None, default_name: str, url: str) -> Path:
    if path is not None:
        return Path(path)
    base = data_dir()
    if base is not None and (base / default_name).exists():
        return base / default_name
    from ..models import default_cache_dir  # download once for users who are online

    cached = default_cache_dir() / "data" / Path(url).name  # the published file, by its own name
    if not cached.exists():
        import urllib.request

        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            urllib.request.urlretrieve(url, cached.with_suffix(".part"))
        except OSError as err:
            raise DatasetError(f"{default_name} not found (set FACTEDIT_DATA_DIR or pass a path) and could not "
                               f"be downloaded from {url}: {err}") from err
        cached.with_suffix(".part").rename(cached)
    return cached


def read_json_list(path: Path, what: str) -> list:
    """The records of a JSON file holding a list, or a DatasetError that says what is wrong."""
    if not path.exists():
        raise DatasetError(f"{what} file not found: {path}")
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(records, list):
        raise DatasetError(f"{path}: expected a JSON list of {what} records, not {json_type(records)}")
    if not records:
        raise DatasetError(f"{path} holds no {what} records (an empty list)")
    return records


def first(records: list, n: int | None) -> list:
    """The first `n` records (all for None); n below 1 is an error, not "all" or "all but the last"."""
    if n is None:
        return records
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"the number of records must be at least 1 (or None: every record), not {n!r}")
    return records[:n]


_EXPECTED = {str: "a string", int: "an integer", dict: "an object", list: "a list"}


def typed_field(record: dict, key: str, kind: type, where: str, parent: str = "", *, optional: bool = False):
    """record[key], checked to be of `kind` (str, int, dict, list; a bool is not an int), or a
    DatasetError naming the place (`where`: file and record), the field (under `parent`, e.g.
    "requested_rewrite."), the expected and the found type. A missing optional field gives None."""
    if key not in record:
        if optional:
            return None
        raise DatasetError(f"{where}: {parent.rstrip('.') or 'the record'} lacks {key!r}")
    value = record[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise DatasetError(f"{where}: {parent}{key} must be {_EXPECTED.get(kind, kind.__name__)}, "
                           f"not {json_type(value)} ({shown})")
    return value


def string_list(record: dict, key: str, where: str, *, optional: bool = True) -> list[str]:
    """record[key] as a list of strings ([] when missing and optional), or a DatasetError naming the
    first element that is not a string."""
    value = typed_field(record, key, list, where, optional=optional)
    if value is None:
        return []
    for i, element in enumerate(value):
        if not isinstance(element, str):
            raise DatasetError(f"{where}: {key}[{i}] must be a string, not {json_type(element)} ({element!r})")
    return value


def check_unique_ids(ids: list, path: Path, key: str) -> None:
    """A DatasetError naming both records if two share an id: results and resumed runs are kept per id."""
    seen: dict = {}
    for index, value in enumerate(ids):
        if value in seen:
            raise DatasetError(f"{path}: records {seen[value]} and {index} have the same {key} {value}; "
                               f"{key} must be unique")
        seen[value] = index


def load_known_facts(path: str | Path | None = None) -> list[KnownFact]:
    """Load known facts from `path`, $FACTEDIT_DATA_DIR/known_1000.json, or the published file."""
    path = _resolve(path, "known_1000.json", KNOWN_FACTS_URL)
    records = read_json_list(path, "known-facts")
    facts = []
    for i, rec in enumerate(records):
        where = f"{path}: record {i}"
        if not isinstance(rec, dict):
            raise DatasetError(f"{where} must be an object, not {json_type(rec)}")
        missing = [key for key in REQUIRED if key not in rec]
        if missing:
            raise DatasetError(f"{where} lacks {', '.join(missing)}")
        known_id = typed_field(rec, "known_id", int, where)
        where = f"{where} (known_id {known_id})"
        subject, attribute, prompt = (typed_field(rec, key, str, where) for key in ("subject", "attribute", "prompt"))
        relation = typed_field(rec, "relation_id", str, where, optional=True) or ""
        if subject not in prompt:
            raise DatasetError(f"{where}: subject {subject!r} not in prompt {prompt!r}")
        facts.append(KnownFact(known_id, subject, attribute, prompt, relation))
    check_unique_ids([fact.known_id for fact in facts], path, "known_id")
    return facts
