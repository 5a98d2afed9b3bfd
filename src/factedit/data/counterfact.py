"""CounterFact (Meng et al. 2022): counterfactual edit requests with paraphrase and neighbourhood
prompts. Accepts the full records and the reduced ones (requested_rewrite + one paraphrase and one
neighbourhood prompt)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..request import EditRequest
from .known import DatasetError, _resolve, read_json_list

COUNTERFACT_URL = "https://rome.baulab.info/data/dsets/counterfact.json"


@dataclass(frozen=True)
class CounterFactRecord:
    case_id: int
    request: EditRequest
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    attribute_prompts: list[str] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)


def _parse(record, index: int, path: Path) -> CounterFactRecord:
    where = f"{path}: record {index}"
    if not isinstance(record, dict):
        raise DatasetError(f"{where} is not an object")
    rewrite = record.get("requested_rewrite")
    if not isinstance(rewrite, dict):
        raise DatasetError(f"{where} lacks requested_rewrite")
    try:
        prompt, subject = rewrite["prompt"], rewrite["subject"]
        new, true = rewrite["target_new"]["str"], rewrite["target_true"]["str"]
    except (KeyError, TypeError) as err:
        raise DatasetError(f"{where}: requested_rewrite lacks {err}") from None
    if "{}" not in prompt:
        raise DatasetError(f"{where}: the prompt {prompt!r} has no '{{}}' for the subject")
    lists = {}
    for key in ("paraphrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts"):
        value = record.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DatasetError(f"{where}: {key} must be a list of strings")
        lists[key] = value
    if "case_id" not in record:
        raise DatasetError(f"{where} lacks case_id")
    return CounterFactRecord(int(record["case_id"]), EditRequest.create(prompt, subject, new, true), **lists)


def load_counterfact(path: str | Path | None = None, n: int | None = None) -> list[CounterFactRecord]:
    """Records from `path`, $FACTEDIT_DATA_DIR/counterfact/counterfact_dev.json, or the published file."""
    path = _resolve(path, "counterfact/counterfact_dev.json", COUNTERFACT_URL)
    records = read_json_list(path, "CounterFact")
    return [_parse(r, i, path) for i, r in enumerate(records[:n] if n else records)]
