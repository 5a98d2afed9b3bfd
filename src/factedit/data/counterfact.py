"""CounterFact (Meng et al. 2022): counterfactual edit requests with paraphrase and neighbourhood
prompts. Accepts the full records and the reduced ones (requested_rewrite + one paraphrase and one
neighbourhood prompt)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import json_type
from ..request import EditRequest
from ..tokens import PromptError
from .known import DatasetError, _resolve, check_unique_ids, first, read_json_list, string_list, typed_field

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
    """One record, every field type-checked; errors name the file, the record and its case_id, the
    field, and the expected and found types."""
    where = f"{path}: record {index}"
    if not isinstance(record, dict):
        raise DatasetError(f"{where} must be an object, not {json_type(record)}")
    case_id = typed_field(record, "case_id", int, where)
    where = f"{where} (case_id {case_id})"
    rewrite = typed_field(record, "requested_rewrite", dict, where)
    prompt = typed_field(rewrite, "prompt", str, where, "requested_rewrite.")
    subject = typed_field(rewrite, "subject", str, where, "requested_rewrite.")
    targets = {}
    for key in ("target_new", "target_true"):
        target = typed_field(rewrite, key, dict, where, "requested_rewrite.")
        targets[key] = typed_field(target, "str", str, where, f"requested_rewrite.{key}.")
    if "{}" not in prompt:
        raise DatasetError(f"{where}: the prompt {prompt!r} has no '{{}}' for the subject")
    lists = {key: string_list(record, key, where)
             for key in ("paraphrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts")}
    try:
        request = EditRequest.create(prompt, subject, targets["target_new"], targets["target_true"])
    except PromptError as err:
        raise DatasetError(f"{where}: {err}") from None
    return CounterFactRecord(case_id, request, **lists)


def load_counterfact(path: str | Path | None = None, n: int | None = None) -> list[CounterFactRecord]:
    """The first `n` records (all for None) from `path`, $FACTEDIT_DATA_DIR/counterfact/counterfact_dev.json,
    or the published file. An empty file, a malformed record or a repeated case_id is a DatasetError."""
    path = _resolve(path, "counterfact/counterfact_dev.json", COUNTERFACT_URL)
    records = [_parse(r, i, path) for i, r in enumerate(first(read_json_list(path, "CounterFact"), n))]
    check_unique_ids([r.case_id for r in records], path, "case_id")
    return records
