"""Tokenise prompts and locate the subject's tokens in them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import FacteditError


class PromptError(FacteditError, ValueError):
    """A prompt or subject that cannot be traced or edited; the message says why."""


# The one limit on the length of every prompt factedit traces, edits or scores (prompts, paraphrases,
# dataset prompts, server requests): longer prompts are almost certainly a mistake for facts, and
# editing one runs for many minutes. Lower where the model's context is shorter (prompt_token_limit).
MAX_PROMPT_TOKENS = 512


@dataclass
class TokenizedPrompt:
    input_ids: torch.Tensor  # (1, T)
    tokens: list[str]  # decoded text of each token, for labels
    subject_range: tuple[int, int]  # [start, end) token indices of the subject

    @property
    def n_tokens(self) -> int:
        return self.input_ids.shape[1]


def _char_spans(tokenizer, prompt: str, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of each token in the prompt: from the tokenizer's offsets when it has them,
    otherwise by decoding ever longer prefixes (slow tokenizers)."""
    try:
        enc = tokenizer(prompt, return_offsets_mapping=True)
        if list(enc["input_ids"]) == ids:
            return [tuple(span) for span in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError):
        pass
    spans, previous = [], 0
    for i in range(len(ids)):
        end = len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True))
        spans.append((previous, end))
        previous = end
    return spans


def subject_token_range(tokenizer, prompt: str, subject: str, ids: list[int]) -> tuple[int, int]:
    """[start, end) indices of the tokens that overlap the first occurrence of `subject` in `prompt`.

    Works on characters, so subjects split oddly by BPE ("The E|iffel Tower") and subjects whose first
    token carries the leading space ("Ġ Tower") are both found. Special tokens (BOS) never match."""
    if not subject or not subject.strip():
        raise PromptError("the subject is empty")
    start_char = prompt.find(subject)
    if start_char < 0:
        hint = ""
        lowered = prompt.lower().find(subject.lower())
        if lowered >= 0:
            hint = f" (it occurs with different capitalisation: {prompt[lowered:lowered + len(subject)]!r})"
        raise PromptError(f"subject {subject!r} does not occur in the prompt {prompt!r}{hint}")
    # Ignore surrounding whitespace of the subject so that " Tower" and "Tower" locate the same tokens.
    start_char += len(subject) - len(subject.lstrip())
    return span_token_range(tokenizer, prompt, ids, start_char, start_char + len(subject.strip()))


def span_token_range(tokenizer, text: str, ids: list[int], start_char: int, end_char: int) -> tuple[int, int]:
    """[start, end) indices of the tokens of `ids` (the tokenization of `text`) that overlap the
    characters [start_char, end_char)."""
    spans = _char_spans(tokenizer, text, ids)
    hits = [i for i, (a, b) in enumerate(spans) if b > a and a < end_char and b > start_char]
    if not hits:
        raise PromptError(f"no token covers characters {start_char}..{end_char} ({text[start_char:end_char]!r})")
    return hits[0], hits[-1] + 1


def prompt_token_limit(model=None) -> int:
    """MAX_PROMPT_TOKENS, or the model's context length (max_position_embeddings) where that is shorter."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(MAX_PROMPT_TOKENS, positions) if isinstance(positions, int) and positions > 0 else MAX_PROMPT_TOKENS


def _check_token_count(n_tokens: int, limit: int, what: str) -> None:
    if n_tokens > limit:
        reason = ("factedit's limit for prompts and paraphrases (MAX_PROMPT_TOKENS)" if limit == MAX_PROMPT_TOKENS
                  else "the model's context length")
        raise PromptError(f"{what} has {n_tokens} tokens; at most {limit} are allowed ({reason})")


def check_prompt_length(lm, text: str, what: str = "the prompt") -> list[int]:
    """The token ids of `text` (a prompt or paraphrase to run through the model `lm`), or a PromptError
    if it has more than prompt_token_limit(lm.model) tokens. `what` names the text in the message.
    The one check on prompt length, used by tracing, editing, the datasets' prompts and the server."""
    if not isinstance(text, str) or not text.strip():
        raise PromptError(f"{what} is empty")
    ids = list(lm.tokenizer(text)["input_ids"])
    _check_token_count(len(ids), prompt_token_limit(lm.model), what)
    return ids


def tokenize_prompt(tokenizer, prompt: str, subject: str, *, max_tokens: int = MAX_PROMPT_TOKENS,
                    device: torch.device | str = "cpu") -> TokenizedPrompt:
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError("the prompt is empty")
    ids = list(tokenizer(prompt)["input_ids"])
    _check_token_count(len(ids), max_tokens, "the prompt")
    start, end = subject_token_range(tokenizer, prompt, subject, ids)
    tokens = [tokenizer.decode([i]) for i in ids]
    return TokenizedPrompt(torch.tensor([ids], device=device), tokens, (start, end))


def answer_matches(answer_token: str, expected: str) -> bool:
    """Whether a predicted first token starts the expected answer ("Par" for "Paris")."""
    token, target = answer_token.strip(), expected.strip()
    return bool(token) and target.startswith(token)
