"""Edit requests: which fact to rewrite, validated against the model's tokenizer."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .tokens import PromptError


@dataclass(frozen=True)
class EditRequest:
    """Rewrite `prompt` (a template with one "{}" for the subject) to continue with `target_new`.

    Targets are continuations: a leading space is added when the prompt does not end in whitespace
    and the target does not start with one ("Rome" -> " Rome"), which is what BPE and SentencePiece
    tokenizers see after a word."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    @classmethod
    def create(cls, prompt: str, subject: str, target_new: str, target_true: str | None = None) -> "EditRequest":
        """Accepts a template with "{}" or a full prompt that contains the subject."""
        if not isinstance(subject, str) or not subject.strip():
            raise PromptError("the subject is empty")
        subject = subject.strip()
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError("the prompt is empty")
        if "{}" not in prompt:
            if subject not in prompt:
                raise PromptError(f"the prompt {prompt!r} has no '{{}}' placeholder and does not contain the "
                                  f"subject {subject!r}")
            prompt = prompt.replace(subject, "{}", 1)
        if prompt.count("{}") != 1:
            raise PromptError(f"the prompt template must contain '{{}}' exactly once: {prompt!r}")
        if not isinstance(target_new, str) or not target_new.strip():
            raise PromptError("the new target is empty")
        request = cls(prompt, subject, _as_continuation(prompt, target_new),
                      _as_continuation(prompt, target_true) if target_true else None)
        if request.target_true is not None and request.target_true.strip() == request.target_new.strip():
            raise PromptError(f"the new target equals the true target ({target_new!r})")
        return request

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EditRequest":
        return cls.create(data["prompt"], data["subject"], data["target_new"], data.get("target_true"))


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
