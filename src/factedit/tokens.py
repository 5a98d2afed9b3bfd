"""Tokenise prompts and locate the subject's tokens in them."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from types import MappingProxyType

import torch

from .errors import FacteditError, FacteditWarning


class PromptError(FacteditError, ValueError):
    """A prompt or subject that cannot be traced or edited; the message says why."""


class SubjectWarning(FacteditWarning):
    """Where the subject sits in a full prompt was a guess: it occurs more than once (the first
    whole-word occurrence is used), or only inside a word ("art" in "start"). The message says which
    occurrence was taken and how to pick another (`occurrence`, `--occurrence N`, counted from 0)."""


# The one limit on the length of every prompt factedit traces, edits or scores (prompts, paraphrases,
# dataset prompts, server requests): longer prompts are almost certainly a mistake for facts, and
# editing one runs for many minutes. Lower where the model's context is shorter (prompt_token_limit).
MAX_PROMPT_TOKENS = 512


@dataclass
class TokenizedPrompt:
    input_ids: torch.Tensor  # (1, T)
    tokens: list[str]  # each token as shown in labels (token_label: byte fragments escaped)
    subject_range: tuple[int, int]  # [start, end) token indices of the subject
    subject_chars: tuple[int, int] | None = None  # [start, end) characters of the subject in the prompt

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


@dataclass(frozen=True)
class SubjectMatch:
    """Where the subject sits in a prompt: characters [start, end) (without the subject's surrounding
    whitespace), which occurrence that is (0-based, counting every occurrence of the subject's text,
    inside words too), and why that choice may not be the one meant (a SubjectWarning's message) or None."""

    start: int
    end: int
    occurrence: int
    warning: str | None = None


def check_occurrence(occurrence) -> int | None:
    """`occurrence` as given (None, or an occurrence counted from 0), or a PromptError."""
    if occurrence is not None and (isinstance(occurrence, bool) or not isinstance(occurrence, int) or occurrence < 0):
        raise PromptError(f"the occurrence must be a whole number from 0 (the first occurrence of the subject), "
                          f"not {occurrence!r}")
    return occurrence


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


def _inside_word(text: str, start: int, end: int) -> bool:
    """Whether text[start:end] continues a word on either side ("art" in "start", "Paris" in "Parisian").
    Only a word character of the subject's own edge counts: "Audible.com" after "www." is whole."""
    return ((start > 0 and _is_word_char(text[start]) and _is_word_char(text[start - 1]))
            or (end < len(text) and _is_word_char(text[end - 1]) and _is_word_char(text[end])))


def subject_starts(prompt: str, subject: str) -> list[int]:
    """Where each occurrence of `subject` in `prompt` starts, left to right and not overlapping (as
    str.replace and str.count count them); the subject's surrounding whitespace must occur too but is
    not part of the match, so that " Tower" and "Tower" locate the same tokens."""
    lead, starts, at = len(subject) - len(subject.lstrip()), [], prompt.find(subject)
    while at >= 0 and subject:
        starts.append(at + lead)
        at = prompt.find(subject, at + len(subject))
    return starts


def find_subject(prompt: str, subject: str, occurrence: int | None = None) -> SubjectMatch:
    """Where `subject` sits in `prompt`: its occurrence number `occurrence` (0-based, counting every
    non-overlapping occurrence left to right, as str.replace and str.count do), or by default the first
    occurrence that is a whole word, else the first one. The match carries a warning when the default
    had to guess: several whole-word occurrences, or only occurrences inside words. An occurrence that
    does not exist, or a subject that does not occur, is a PromptError."""
    check_occurrence(occurrence)
    if not isinstance(subject, str) or not subject.strip():
        raise PromptError("the subject is empty")
    starts, core = subject_starts(prompt, subject), len(subject.strip())
    if not starts:
        hint = ""
        lowered = prompt.lower().find(subject.lower())
        if lowered >= 0:
            hint = f" (it occurs with different capitalisation: {prompt[lowered:lowered + len(subject)]!r})"
        raise PromptError(f"subject {subject!r} does not occur in the prompt {prompt!r}{hint}")
    if occurrence is not None:
        if occurrence >= len(starts):
            raise PromptError(f"there is no occurrence {occurrence} of subject {subject!r} in the prompt {prompt!r}: "
                              f"it occurs {len(starts)} time(s), and occurrences count from 0")
        return SubjectMatch(starts[occurrence], starts[occurrence] + core, occurrence)
    whole = [i for i, start in enumerate(starts) if not _inside_word(prompt, start, start + core)]
    chosen = whole[0] if whole else 0
    start = starts[chosen]
    how = "pick another with occurrence=N (--occurrence N), counted from 0"
    warning = None
    if len(whole) > 1:
        warning = (f"subject {subject!r} occurs {len(whole)} times as a word in the prompt {prompt!r}; using "
                   f"occurrence {chosen} (at character {start}); {how}")
    elif not whole:
        word = _word_around(prompt, start, start + core)
        more = (f", and {len(starts) - 1} more time(s); using occurrence 0; check the subject, or {how}"
                if len(starts) > 1 else "; check the subject")
        warning = (f"subject {subject!r} occurs only inside a word in the prompt {prompt!r}: in {word!r} at "
                   f"character {start}{more}")
    return SubjectMatch(start, start + core, chosen, warning)


def _word_around(text: str, start: int, end: int) -> str:
    while start > 0 and _is_word_char(text[start - 1]):
        start -= 1
    while end < len(text) and _is_word_char(text[end]):
        end += 1
    return text[start:end]


def subject_token_range(tokenizer, prompt: str, subject: str, ids: list[int], occurrence: int | None = None
                        ) -> tuple[int, int]:
    """[start, end) indices of the tokens that overlap `subject` in `prompt`, at the occurrence
    find_subject picks (silently: tokenize_prompt is what warns).

    Works on characters, so subjects split oddly by BPE ("The E|iffel Tower") and subjects whose first
    token carries the leading space ("Ġ Tower") are both found. Special tokens (BOS) never match."""
    match = find_subject(prompt, subject, occurrence)
    return span_token_range(tokenizer, prompt, ids, match.start, match.end)


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


def tokenize_prompt(tokenizer, prompt: str, subject: str, *, occurrence: int | None = None,
                    max_tokens: int = MAX_PROMPT_TOKENS, device: torch.device | str = "cpu") -> TokenizedPrompt:
    """The prompt's tokens and where the subject sits among them: at its occurrence number
    `occurrence` (0-based; see find_subject), or by default at its first whole-word occurrence, with a
    SubjectWarning when that was a guess (the subject occurs several times, or only inside a word)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError("the prompt is empty")
    match = find_subject(prompt, subject, occurrence)
    ids = list(tokenizer(prompt)["input_ids"])
    _check_token_count(len(ids), max_tokens, "the prompt")
    start, end = span_token_range(tokenizer, prompt, ids, match.start, match.end)
    if match.warning:
        warnings.warn(match.warning, SubjectWarning, stacklevel=2)
    tokens = [token_label(tokenizer, i) for i in ids]
    return TokenizedPrompt(torch.tensor([ids], device=device), tokens, (start, end), (match.start, match.end))


def _byte_level_alphabet() -> dict[str, int]:
    """The character that stands for each byte in byte-level BPE vocabularies (GPT-2's bytes_to_unicode:
    printable bytes as themselves, the others shifted past U+0100), mapped back to the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {chr(b): b for b in printable}, 0
    for b in range(256):
        if b not in printable:
            chars[chr(256 + shifted)] = b
            shifted += 1
    return chars


_BYTE_LEVEL_CHARS = MappingProxyType(_byte_level_alphabet())
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback tokens (Llama, Gemma)


def _token_bytes(tokenizer, token_id: int) -> bytes | None:
    """The raw bytes a token stands for, from its vocabulary entry, where the vocabulary spells them
    (byte-level BPE, SentencePiece byte fallback); None otherwise."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    piece = convert(int(token_id)) if convert is not None else None
    if not isinstance(piece, str) or not piece:
        return None
    byte = _BYTE_PIECE.fullmatch(piece)
    if byte:
        return bytes([int(byte.group(1), 16)])
    if all(char in _BYTE_LEVEL_CHARS for char in piece):
        return bytes(_BYTE_LEVEL_CHARS[char] for char in piece)
    return None


def _escape_broken_utf8(raw: bytes) -> str:
    """`raw` as text, each byte that is not part of a whole UTF-8 character written as <0xE6>."""
    parts = []
    while raw:
        try:
            parts.append(raw.decode("utf-8"))
            break
        except UnicodeDecodeError as err:
            parts.append(raw[:err.start].decode("utf-8"))
            parts.extend(f"<0x{b:02X}>" for b in raw[err.start:err.end])
            raw = raw[err.end:]
    return "".join(parts)


def token_label(tokenizer, token_id: int) -> str:
    """One token as shown to people (trace summaries, heatmap labels, the traced answer): its decoded
    text, except for a token that is a fragment of a UTF-8 character (byte-level BPE splits emoji and
    CJK characters into such tokens), which decodes to U+FFFD: there its bytes are written out, e.g.
    ' <0xE6>' (as SentencePiece names its byte tokens), so that different fragments stay apart."""
    text = tokenizer.decode([int(token_id)])
    if "\ufffd" not in text:
        return text
    raw = _token_bytes(tokenizer, token_id)
    return text if raw is None else _escape_broken_utf8(raw)


def answer_matches(answer_token: str, expected: str) -> bool:
    """Whether a predicted first token starts the expected answer ("Par" for "Paris")."""
    token, target = answer_token.strip(), expected.strip()
    return bool(token) and target.startswith(token)
