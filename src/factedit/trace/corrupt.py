"""How a trace corrupts the subject: Gaussian noise on its token embeddings (the paper), or its tokens
swapped for another subject's (symmetric token replacement; Zhang & Nanda 2024, arXiv 2309.16042).

Both act on what the embedding module outputs at the subject's positions, one batch row per noise
sample: `gaussian` adds a draw of noise, `replace` puts another subject's embeddings there. A
replacement subject comes from a pool (the known facts), must take exactly the subject's token
positions in the prompt (the same token count, every other token unchanged) and must have an answer
whose first token differs from the traced one, so that the corrupted prompt asks for another fact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import InputError
from ..hooks import Hook
from ..tokens import PromptError, TokenizedPrompt, subject_token_range

CORRUPTIONS = ("gaussian", "replace")


def check_corruption(name: str, noise: float | None = None, *, command_line: bool = False) -> str:
    """The one check of a trace's corruption: `name` one of CORRUPTIONS, and no `noise` (a Gaussian
    noise std) with token replacement, which adds none. `command_line`: name them as the options
    (--corrupt, --noise), for the commands, which check before the model loads."""
    if name not in CORRUPTIONS:
        raise InputError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if name == "replace" and noise is not None:
        noise_name, replace = ("--noise", "--corrupt replace") if command_line else ("noise", "corrupt='replace'")
        raise InputError(f"{noise_name} sets Gaussian noise; {replace} swaps the subject's tokens and takes no noise")
    return name


class NoReplacement(InputError):
    """No subject in the pool can take the traced subject's place."""


@dataclass(frozen=True)
class Replacement:
    subject: str
    token_ids: tuple[int, ...]  # in place of the subject's tokens
    answer_id: int  # first token of the replacement subject's own answer


def answer_token(tokenizer, attribute: str) -> int | None:
    """First token of an answer as the model predicts it after a prompt: with its leading space."""
    ids = tokenizer(" " + attribute.strip(), add_special_tokens=False)["input_ids"]
    return ids[0] if ids else None


def choose_replacements(tokenizer, prompt: str, subject: str, tokenized: TokenizedPrompt, answer_id: int,
                        pool: Sequence[tuple[str, str]], samples: int, seed: int) -> list[Replacement]:
    """Up to `samples` different replacement subjects from `pool` ((subject, answer) pairs), tried in
    an order shuffled by `seed` and the subject (reproducible, and not the same order for every fact).
    Raises NoReplacement when none fits."""
    ids = tokenized.input_ids[0].tolist()
    start, end = tokenized.subject_range
    candidates = sorted({(s, a) for s, a in pool if s.strip() and s.strip() != subject.strip()})
    random.Random(f"{seed}:{subject}").shuffle(candidates)
    chosen: list[Replacement] = []
    seen: set[tuple[int, ...]] = set()
    # the occurrence the prompt was tokenized at (not always the first: tokens.find_subject)
    at, stop = tokenized.subject_chars or (prompt.find(subject), prompt.find(subject) + len(subject))
    for other, attribute in candidates:
        swapped = prompt[:at] + other + prompt[stop:]
        other_ids = list(tokenizer(swapped)["input_ids"])
        if len(other_ids) != len(ids) or other_ids[:start] != ids[:start] or other_ids[end:] != ids[end:]:
            continue
        try:
            if subject_token_range(tokenizer, swapped, other, other_ids) != (start, end):
                continue
        except PromptError:
            continue
        tokens, other_answer = tuple(other_ids[start:end]), answer_token(tokenizer, attribute)
        if tokens == tuple(ids[start:end]) or tokens in seen or other_answer in (None, answer_id):
            continue
        seen.add(tokens)
        chosen.append(Replacement(other, tokens, other_answer))
        if len(chosen) == samples:
            break
    if not chosen:
        raise NoReplacement(f"no subject in the pool of {len(candidates)} takes the place of {subject!r} "
                         f"({end - start} token(s)) with another answer; use --corrupt gaussian or a larger pool")
    return chosen


def corruption_hook(embed, values: torch.Tensor, subject_range: tuple[int, int], *, replace: bool,
                    offset: int = 0, rows_per_sample: int = 1) -> Hook:
    """Corrupt the subject's positions of the embedding module's output: add `values` (Gaussian
    noise) or put them there (replacement embeddings). values: (samples, n_subject_tokens, d).

    `offset`: absolute position of the first input token (inputs may be a suffix after a cache).
    `rows_per_sample`: batch rows are ordered sample-major, each sample repeated this many times."""
    start, end = subject_range
    lo, hi = max(start, offset), end  # absolute positions of the subject present in this input

    def corrupt(embedded: torch.Tensor) -> torch.Tensor:
        if hi <= lo:
            return embedded
        embedded = embedded.clone()
        rows = values[:, lo - start:hi - start].to(embedded.device, embedded.dtype)
        rows = rows.repeat_interleave(rows_per_sample, dim=0)
        if replace:
            embedded[:, lo - offset:hi - offset] = rows
        else:
            embedded[:, lo - offset:hi - offset] += rows
        return embedded

    return Hook(embed, edit_output=corrupt)
