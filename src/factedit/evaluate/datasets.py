"""The dataset registry: how each benchmark's records are loaded and scored on a model.

A dataset turns a record into raw numbers on the model as it is now (probabilities, teacher-forced
predictions, greedy continuations) and raw numbers into per-record scores; the runner never branches
on dataset names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..data.counterfact import CounterFactRecord, load_counterfact
from ..data.zsre import ZsreRecord, load_zsre
from ..errors import InputError
from ..request import target_ids
from ..generate import generate_batch
from ..models import LoadedModel
from ..scoring import target_logprobs, teacher_forced_predictions
from .metrics import counterfact_record_scores, generative_scores, token_accuracy


@dataclass(frozen=True)
class Dataset:
    name: str
    load: Callable[..., list]  # (path=None, n=None) -> records with .case_id and .request
    prompts: Callable[[object], dict[str, list[str]]]  # record -> its prompts by field (for the length check)
    probabilities: Callable[[LoadedModel, object], dict]  # (lm, record) -> raw numbers to score
    scores: Callable[[dict], dict[str, float]]  # raw numbers -> per-record scores
    # Fluency and consistency (optional): prompts to generate from on the edited model, and prompts
    # whose generations on the unedited model serve as reference texts about the new object.
    generation_prompts: Callable[[object], list[str]] | None = None
    reference_prompts: Callable[[object], list[str]] | None = None


def counterfact_prompts(record: CounterFactRecord) -> dict[str, list[str]]:
    return {"prompt": [record.request.text], "paraphrase_prompts": record.paraphrase_prompts,
            "neighborhood_prompts": record.neighborhood_prompts, "attribute_prompts": record.attribute_prompts,
            "generation_prompts": record.generation_prompts}


def zsre_prompts(record: ZsreRecord) -> dict[str, list[str]]:
    return {"src": [record.request.text], "rephrase": [record.paraphrase], "loc": [record.loc]}


def counterfact_probabilities(lm: LoadedModel, record: CounterFactRecord) -> dict:
    """P(new) and P(true) for every prompt group, all prompts of the record in one batch."""
    groups = {"rewrite": [record.request.text], "paraphrase": record.paraphrase_prompts,
              "neighborhood": record.neighborhood_prompts}
    prompts = [p for ps in groups.values() for p in ps]
    targets = [record.request.target_new, record.request.target_true]
    logp = target_logprobs(lm, prompts * 2, [targets[0]] * len(prompts) + [targets[1]] * len(prompts)).exp().tolist()
    out, i = {"p_new": {}, "p_true": {}}, 0
    for group, ps in groups.items():
        out["p_new"][group] = logp[i:i + len(ps)]
        out["p_true"][group] = logp[len(prompts) + i:len(prompts) + i + len(ps)]
        i += len(ps)
    out["greedy"] = greedy_groups(lm, {g: groups[g] for g in ("rewrite", "paraphrase")}, targets)
    out["objects"] = {"new": targets[0], "true": targets[1]}
    return out


GENERATIVE_EXTRA_TOKENS = 5  # generated beyond the longer object, so that what follows it shows


def greedy_groups(lm: LoadedModel, groups: dict[str, list[str]], objects: list[str]) -> dict[str, list[str]]:
    """Greedy continuations of every prompt of each group, all in one batch, as long as the longest
    object plus a few tokens: what a user of the edited model sees."""
    objects = [o for o in objects if o]
    n_new = max(len(target_ids(lm.tokenizer, o)) for o in objects) + GENERATIVE_EXTRA_TOKENS
    prompts = [p for ps in groups.values() for p in ps]
    rows = generate_batch(lm, [list(lm.tokenizer(p)["input_ids"]) for p in prompts], n_new)
    texts = [lm.tokenizer.decode(row, skip_special_tokens=True) for row in rows]
    out, i = {}, 0
    for group, ps in groups.items():
        out[group], i = texts[i:i + len(ps)], i + len(ps)
    return out


def counterfact_scores(raw: dict) -> dict[str, float]:
    scores = counterfact_record_scores(raw["p_new"], raw["p_true"])
    if "greedy" in raw:  # case files written before the generative metric have none
        scores.update(generative_scores(raw["greedy"], raw["objects"]["new"], raw["objects"]["true"],
                                        {"rewrite": "GenES", "paraphrase": "GenPS"}, "GenOld"))
    return scores


def zsre_predictions(lm: LoadedModel, record: ZsreRecord) -> dict:
    """Teacher-forced predictions of the new answer on the question and its rephrasing, and of the
    unrelated question's answer (specificity), in one batch."""
    new = record.request.target_new
    pairs = teacher_forced_predictions(lm, [record.request.text, record.paraphrase, record.loc],
                                       [new, new, " " + record.loc_ans.strip()])
    out = {group: {"predicted": predicted, "target": target}
           for group, (predicted, target) in zip(("rewrite", "paraphrase", "neighborhood"), pairs)}
    true = record.request.target_true
    out["greedy"] = greedy_groups(lm, {"rewrite": [record.request.text], "paraphrase": [record.paraphrase]},
                                  [new, true])
    out["objects"] = {"new": new, "true": true}
    return out


def zsre_scores(raw: dict) -> dict[str, float]:
    scores = {name: token_accuracy(raw[group]["predicted"], raw[group]["target"])
              for name, group in (("efficacy", "rewrite"), ("paraphrase", "paraphrase"),
                                  ("specificity", "neighborhood"))}
    if "greedy" in raw:
        scores.update(generative_scores(raw["greedy"], raw["objects"]["new"], raw["objects"]["true"],
                                        {"rewrite": "gen_efficacy", "paraphrase": "gen_paraphrase"}, "gen_old"))
    return scores


DATASETS: dict[str, Dataset] = {
    "counterfact": Dataset("counterfact", load_counterfact, counterfact_prompts, counterfact_probabilities,
                           counterfact_scores,
                           generation_prompts=lambda r: r.generation_prompts,
                           reference_prompts=lambda r: r.attribute_prompts),
    "zsre": Dataset("zsre", load_zsre, zsre_prompts, zsre_predictions, zsre_scores),
}


def get_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]
