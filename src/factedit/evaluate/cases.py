"""One case file per record: scoring a batch on the model as it is, and writing it (runner.py,
sequential.py). A case holds the unedited ("pre") and edited ("post") probabilities and scores, what
the editor reported, and, in sequential runs, the scores once every batch is applied ("final")."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import InputError
from ..generate import generate_batch
from ..models import LoadedModel, default_cache_dir
from ..run_folder import write_json
from .datasets import Dataset
from .metrics import generation_entropy, tfidf_consistency


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def generations(lm: LoadedModel, prompts: list[str], seed: int, n_new: int = 100, top_k: int = 5) -> list[str]:
    """Sampled continuations (top-k, seeded), as the paper generated its fluency texts; all prompts
    in one batch."""
    if not prompts:
        return []
    prompt_ids = [list(lm.tokenizer(prompt)["input_ids"]) for prompt in prompts]
    out = generate_batch(lm, prompt_ids, n_new, top_k=top_k, seed=seed)
    return [lm.tokenizer.decode(row, skip_special_tokens=True) for row in out]


def generation_scores(generated: list[str], references: list[str]) -> dict[str, float]:
    """GE (generation entropy) and RS* (TF-IDF consistency against the stand-in references), as
    fractions of the paper's x100 scale (the summary multiplies by 100)."""
    scores = {"GE": generation_entropy(generated) / 100}
    if references:
        scores["RS*"] = tfidf_consistency(generated, references) / 100
    return scores


def case_path(out: Path, record) -> Path:
    return out / "cases" / f"{record.case_id}.json"


def references_for(lm, ds: Dataset, record, generation: bool, tokens: int) -> list[str]:
    """The unedited model's generations for the reference prompts. They do not depend on the method,
    so they are cached on disk, keyed by the model's weights, the prompts, the seed and the length."""
    if not generation:
        return []
    prompts = ds.reference_prompts(record)
    key = hashlib.sha256(json.dumps([prompts, record.case_id, tokens]).encode()).hexdigest()[:16]
    path = default_cache_dir() / "references" / lm.fingerprint / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    texts = generations(lm, prompts, record.case_id, tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, texts)
    return texts


def per_case(diagnostics: list[dict], n: int) -> list[dict]:
    """One diagnostics dict per case: methods report one per request, or one for the whole batch
    (fine-tuning trains all requests together)."""
    if len(diagnostics) == n:
        return diagnostics
    return [diagnostics[0] if diagnostics else {}] * n


def score_and_write(lm, ds: Dataset, out: Path, batch, pre, references, generation, tokens, edit_seconds,
                     diagnostics: list[dict]) -> None:
    """Score the batch on the (edited) model as it is now and write one case file each, with what the
    editor reported about each edit (steps, final loss, whether the optimisation converged)."""
    for record, before, refs, info in zip(batch, pre, references, per_case(diagnostics, len(batch))):
        after = ds.probabilities(lm, record)
        texts = generations(lm, ds.generation_prompts(record), record.case_id, tokens) if generation else []
        post_scores = ds.scores(after)
        if generation:
            post_scores.update(generation_scores(texts, refs))
        case = {"case_id": record.case_id, "request": record.request.to_dict(), "pre": before, "post": after,
                "pre_scores": ds.scores(before), "post_scores": post_scores, "generated": texts, "references": refs,
                "edit_seconds": edit_seconds / len(batch), "batch_size": len(batch), "edit": info}
        path = case_path(out, record)
        write_json(path, case)


def _final_is_current(case: dict, record, n_records: int) -> bool:
    """Whether `case` (a case file's contents) is `record`'s, scored after all `n_records` edits."""
    return case.get("final_after") == n_records and case.get("request") == record.request.to_dict()


def score_after_all(lm, ds: Dataset, out: Path, records) -> None:
    """Score every case again on the model that holds all the edits ("final"): an early edit may be
    undone or damaged by later ones, which the scores taken right after each edit cannot show. Each
    case records after how many edits it was scored ("final_after"); one already scored after all
    of `records` is skipped, so that a run killed while scoring goes on where it stopped. A case file
    that holds another request is refused: its scores after its own edit would not be this record's."""
    for record in records:
        path = case_path(out, record)
        case = json.loads(path.read_text())
        if case.get("request") != record.request.to_dict():
            raise InputError(f"{path} holds the case of another request than record {record.case_id}'s; "
                             "use another --out")
        if _final_is_current(case, record, len(records)):
            continue
        case["final"] = ds.probabilities(lm, record)
        case["final_scores"] = ds.scores(case["final"])
        case["final_after"] = len(records)
        write_json(path, case)


def scored_after_all(out: Path, records) -> bool:
    """Whether every case of `records` has its file, for its request, scored after all of them
    (score_after_all)."""
    def done(record) -> bool:
        path = case_path(out, record)
        return path.exists() and _final_is_current(json.loads(path.read_text()), record, len(records))

    return all(done(record) for record in records)
