"""A file of edit requests for a batch: a JSON list whose items are either requests
({"prompt", "subject", "target_new", optional "target_true" and "occurrence"}, as an edit file stores them) or
CounterFact records (their requested_rewrite), so a slice of CounterFact can be applied as it is."""

from __future__ import annotations

from pathlib import Path

from ..errors import json_type
from ..request import EditRequest
from ..tokens import PromptError
from .counterfact import _parse as parse_counterfact
from .known import DatasetError, read_json_list, typed_field


def load_requests(path: str | Path) -> list[EditRequest]:
    """The requests in `path`; a DatasetError names the item and the field that is wrong."""
    path = Path(path)
    return [_request(item, i, path) for i, item in enumerate(read_json_list(path, "requests"))]


def _request(item, index: int, path: Path) -> EditRequest:
    where = f"{path}: request {index}"
    if not isinstance(item, dict):
        raise DatasetError(f"{where} must be an object, not {json_type(item)}")
    if "requested_rewrite" in item:
        return parse_counterfact(item, index, path).request
    fields = {key: typed_field(item, key, str, where) for key in ("prompt", "subject", "target_new")}
    # null, as EditRequest.to_dict writes an unknown current target, means the same as absent
    target_true = typed_field(item, "target_true", str, where, optional=True) \
        if item.get("target_true") is not None else None
    occurrence = typed_field(item, "occurrence", int, where, optional=True) \
        if item.get("occurrence") is not None else None
    try:
        return EditRequest.create(fields["prompt"], fields["subject"], fields["target_new"], target_true, occurrence)
    except PromptError as err:
        raise DatasetError(f"{where}: {err}") from None
