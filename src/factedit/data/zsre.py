"""zsRE in the MEND/ROME format: a question about a subject, its rephrasing, a counterfactual answer
(`alt`, the edit target), the true answers, and an unrelated Natural Questions item (`loc`,
`loc_ans`) for specificity."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..request import EditRequest
from .known import DatasetError, _resolve, read_json_list

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
    for i, record in enumerate(records[:n] if n else records):
        missing = [f for f in FIELDS if not isinstance(record, dict) or f not in record]
        if missing:
            raise DatasetError(f"{path}: record {i} lacks {', '.join(missing)}")
        if not str(record["alt"]).strip():
            continue
        if record["subject"] not in record["src"]:
            raise DatasetError(f"{path}: record {i}: subject {record['subject']!r} not in question {record['src']!r}")
        true = (record["answers"] or [None])[0]
        if true is not None and true.strip() == record["alt"].strip():
            true = None  # a few records ask for the answer they already have; zsRE scores ignore it
        request = EditRequest.create(record["src"], record["subject"], record["alt"], true)
        out.append(ZsreRecord(i, request, record["rephrase"], record["loc"], record["loc_ans"]))
    return out
