"""Edit requests: which fact to rewrite, validated against the model's tokenizer."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

from .tokens import PromptError, SubjectWarning, check_occurrence, find_subject, subject_starts


@dataclass(frozen=True)
class EditRequest:
    """Rewrite `prompt` (a template with one "{}" for the subject) to continue with `target_new`.

    Targets are continuations: a leading space is added when the prompt does not end in whitespace
    and the target does not start with one ("Rome" -> " Rome"), which is what BPE and SentencePiece
    tokenizers see after a word.

    `occurrence`: the occurrence of the subject in a full prompt (counted from 0, see
    tokens.find_subject) that the user chose as the one to edit; None where find_subject's default
    chose it (the first whole-word occurrence) or a template was given. The template holds the choice
    either way; the field records it in saved requests (to_dict leaves out None, so that other
    requests are saved, compared and hashed as before)."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    occurrence: int | None = None

    @classmethod
    def create(cls, prompt: str, subject: str, target_new: str, target_true: str | None = None,
               occurrence: int | None = None) -> "EditRequest":
        """Accepts a template with "{}" or a full prompt that contains the subject (at `occurrence`, or
        where tokens.find_subject puts it by default: a SubjectWarning says when that was a guess).
        An empty or None `target_true` means unknown (generate.with_current_target fills it in)."""
        if not isinstance(subject, str) or not subject.strip():
            raise PromptError("the subject is empty")
        subject = subject.strip()
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError("the prompt is empty")
        check_occurrence(occurrence)
        if "{}" not in prompt:
            if subject not in prompt:
                raise PromptError(f"the prompt {prompt!r} has no '{{}}' placeholder and does not contain the "
                                  f"subject {subject!r}")
            match = find_subject(prompt, subject, occurrence)
            if match.warning:
                warnings.warn(match.warning, SubjectWarning, stacklevel=2)
            prompt = prompt[:match.start] + "{}" + prompt[match.end:]
        if prompt.count("{}") != 1:
            raise PromptError(f"the prompt template must contain '{{}}' exactly once: {prompt!r}")
        if occurrence is not None and _template_occurrence(prompt, subject) != occurrence:
            raise PromptError(f"occurrence {occurrence} of subject {subject!r} is not where the template {prompt!r} "
                              f"puts it ('{{}}'); give the occurrence with the full prompt, or the template alone")
        if not isinstance(target_new, str) or not target_new.strip():
            raise PromptError("the new target is empty")
        if target_true is not None and not isinstance(target_true, str):
            raise PromptError(f"the true target must be text, not {target_true!r}")
        if target_true and not target_true.strip():
            raise PromptError(f"the true target {target_true!r} is only whitespace; give the current object, or "
                              "leave it out to use the model's current next token")
        request = cls(prompt, subject, _as_continuation(prompt, target_new),
                      _as_continuation(prompt, target_true) if target_true else None, occurrence)
        if request.target_true is not None and request.target_true.strip() == request.target_new.strip():
            raise PromptError(f"the new target equals the true target ({target_new!r})")
        return request

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1)

    @property
    def subject_occurrence(self) -> int | None:
        """Which occurrence of the subject in `text` is the one edited (0-based): what to pass as
        `occurrence` to tokenize_prompt(tokenizer, request.text, request.subject) so that it locates
        the subject where the template puts it, without a warning."""
        return _template_occurrence(self.prompt, self.subject)

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["occurrence"] is None:  # requests saved before occurrences existed look the same
            del data["occurrence"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "EditRequest":
        return cls.create(data["prompt"], data["subject"], data["target_new"], data.get("target_true"),
                          data.get("occurrence"))


def _template_occurrence(template: str, subject: str) -> int | None:
    """The occurrence number of the subject that the template's "{}" becomes in the filled text (None
    in the odd case that counting occurrences in the text does not meet the "{}", e.g. "aa" in "a{}")."""
    at = template.index("{}")
    starts = subject_starts(template.replace("{}", subject, 1), subject)
    return starts.index(at) if at in starts else None


def _as_continuation(prompt: str, target: str) -> str:
    target = target.rstrip()
    if prompt and not prompt[-1].isspace() and not target[:1].isspace():
        return " " + target
    return target


def target_ids(tokenizer, target: str) -> list[int]:
    ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if not ids:
        raise PromptError(f"the target {target!r} tokenizes to nothing")
    return ids
