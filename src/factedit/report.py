"""The before/after report around an edit, one for the CLI (which prints it as text) and the
workbench (which sends it as JSON): the probabilities of the old and the new target on the prompt,
on the paraphrases and on the prompt after short texts sampled from the model, and the prompt's
greedy continuation, each measured before and after the edit."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, TypeVar

from .generate import greedy_continuation, sample_texts
from .models import LoadedModel
from .request import EditRequest
from .scoring import target_probs

T = TypeVar("T")
N_NEW = 20  # tokens of the greedy continuations


@dataclass(frozen=True)
class Check:
    label: str  # "prompt", "paraphrase" or "prefixed (sampled)"
    prompt: str


@dataclass(frozen=True)
class CheckRow:
    label: str
    prompt: str
    old_before: float
    old_after: float
    new_before: float
    new_after: float


@dataclass(frozen=True)
class EditReport:
    old: str  # the current target (target_true)
    new: str  # the new target
    rows: list[CheckRow]  # the prompt first, then the paraphrases, then the prefixed prompts
    generation_before: str  # the prompt followed by its greedy continuation
    generation_after: str

    def to_dict(self) -> dict:
        return asdict(self)


def checks_for(lm: LoadedModel, request: EditRequest, paraphrases: list[str] = (), *, prefixes: int = 2,
               seed: int = 0) -> list[Check]:
    """The prompts a report measures: the request's prompt, the paraphrases, and the prompt after
    `prefixes` short texts sampled from the model (seeded; not ROME's own context templates, so they
    show the edit in contexts it was not optimised for)."""
    starts = (["The", "In"] * prefixes)[:prefixes]
    texts = sample_texts(lm, starts, 1, 8, top_k=5, seed=seed + 7, context="\n") if prefixes else []
    return ([Check("prompt", request.text)] + [Check("paraphrase", text) for text in paraphrases]
            + [Check("prefixed (sampled)", f"{text.strip()}. {request.text}") for text in texts])


@dataclass(frozen=True)
class _Reading:
    old: list[float]
    new: list[float]
    generation: str


def _read(lm: LoadedModel, request: EditRequest, checks: list[Check], n_new: int) -> _Reading:
    prompts = [check.prompt for check in checks]
    return _Reading(target_probs(lm, prompts, [request.target_true] * len(prompts)),
                    target_probs(lm, prompts, [request.target_new] * len(prompts)),
                    request.text + greedy_continuation(lm, request.text, n_new))


def report_around(lm: LoadedModel, request: EditRequest, checks: list[Check], make_edit: Callable[[], T], *,
                  n_new: int = N_NEW) -> tuple[EditReport, T]:
    """Measure `checks` and the greedy continuation, run `make_edit` (which computes the edit and
    leaves it applied to `lm`), measure again. Returns the report and what `make_edit` returned.
    `request` needs its current target (generate.with_current_target)."""
    before = _read(lm, request, checks, n_new)
    made = make_edit()
    after = _read(lm, request, checks, n_new)
    rows = [CheckRow(check.label, check.prompt, before.old[i], after.old[i], before.new[i], after.new[i])
            for i, check in enumerate(checks)]
    return EditReport(request.target_true, request.target_new, rows, before.generation, after.generation), made
