"""zsRE in the MEND/ROME format: a question about a subject, its rephrasing, a counterfactual answer
(`alt`, the edit target), the true answers, and an unrelated Natural Questions item (`loc`,
`loc_ans`) for specificity."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import json_type
from ..request import EditRequest
from ..tokens import PromptError
from .known import DatasetError, _resolve, first, read_json_list, string_list, typed_field

ZSRE_URL = "https://rome.baulab.info/data/dsets/zsre_mend_eval.json"
FIELDS = ("subject", "src", "rephrase", "alt", "answers", "loc", "loc_ans")


@dataclass(frozen=True)
class ZsreRecord:
    case_id: int
    request: EditRequest  # src -> alt (true target: answers[0])
    paraphrase: str
    loc: str
    loc_ans: str


def load_zsre(path: str | Path | None = None, n: int | None = None) -> list[ZsreRecord]:
    """Records from `path`, $FACTEDIT_DATA_DIR/zsre/zsre_train_1k.json, or the published eval file.
    Records without a new answer (`alt` empty: 2 of the 1,000 here) cannot be edited and are left
    out; case ids stay the records' positions in the file."""
    path = _resolve(path, "zsre/zsre_train_1k.json", ZSRE_URL)
    records = read_json_list(path, "zsRE")
    out = []
    for i, record in enumerate(first(records, n)):
        where = f"{path}: record {i}"
        if not isinstance(record, dict):
            raise DatasetError(f"{where} must be an object, not {json_type(record)}")
        missing = [f for f in FIELDS if f not in record]
        if missing:
            raise DatasetError(f"{where} lacks {', '.join(missing)}")
        subject, src, rephrase, alt, loc, loc_ans = (typed_field(record, key, str, where) for key in
                                                     ("subject", "src", "rephrase", "alt", "loc", "loc_ans"))
        answers = string_list(record, "answers", where, optional=False)
        if not alt.strip():
            continue
        if subject not in src:
            raise DatasetError(f"{where}: subject {subject!r} not in question {src!r}")
        true = answers[0] if answers else None
        if true is not None and true.strip() == alt.strip():
            true = None  # a few records ask for the answer they already have; zsRE scores ignore it
        try:
            request = EditRequest.create(src, subject, alt, true)
        except PromptError as err:
            raise DatasetError(f"{where}: {err}") from None
        out.append(ZsreRecord(i, request, rephrase, loc, loc_ans))
    if not out:
        raise DatasetError(f"{path}: none of the {min(len(records), n or len(records))} records read has a new "
                           f"answer (alt) to edit")
    return out
