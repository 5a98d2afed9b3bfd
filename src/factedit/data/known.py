"""The ROME paper's "known facts" (known_1000.json): prompts whose answer the model should know."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

KNOWN_FACTS_URL = "https://rome.baulab.info/data/dsets/known_1000.json"
REQUIRED = ("known_id", "subject", "attribute", "prompt")


class DatasetError(ValueError):
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
        raise DatasetError(f"{path}: expected a JSON list of {what} records")
    return records


def load_known_facts(path: str | Path | None = None) -> list[KnownFact]:
    """Load known facts from `path`, $FACTEDIT_DATA_DIR/known_1000.json, or the published file."""
    path = _resolve(path, "known_1000.json", KNOWN_FACTS_URL)
    records = read_json_list(path, "known-facts")
    facts = []
    for i, rec in enumerate(records):
        missing = [key for key in REQUIRED if not isinstance(rec, dict) or key not in rec]
        if missing:
            raise DatasetError(f"{path}: record {i} lacks {', '.join(missing)}")
        if rec["subject"] not in rec["prompt"]:
            raise DatasetError(f"{path}: record {i}: subject {rec['subject']!r} not in prompt {rec['prompt']!r}")
        facts.append(KnownFact(int(rec["known_id"]), rec["subject"], rec["attribute"], rec["prompt"],
                               rec.get("relation_id", "")))
    return facts
