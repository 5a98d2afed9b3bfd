"""Prompts as the editors feed them to the model: a request's text inside a context template, the
subject's last token located exactly, batched; and a module's input and output read there."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hooks import Hook
from ..models import LoadedModel
from ..tokens import span_token_range
from ..request import EditRequest


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded: causal attention never looks at the padding
    subject_last: list[int]  # index of the subject's last token per row


def fill(template: str, request_text: str, subject_start: int, subject: str) -> tuple[str, tuple[int, int]]:
    """Put the request's text into a context template; returns the text and the subject's characters
    (known exactly: a sampled prefix may mention the subject too)."""
    at = template.index("{}")
    start = at + subject_start
    return template.replace("{}", request_text, 1), (start, start + len(subject))


def prompt_batch(lm: LoadedModel, texts: list[tuple[str, tuple[int, int]]],
                 suffixes: list[list[int]] | None = None) -> Batch:
    """Tokenise (text, subject span) pairs, append suffix ids, right-pad into one batch."""
    rows, last = [], []
    for i, (text, (start, end)) in enumerate(texts):
        ids = list(lm.tokenizer(text)["input_ids"])
        last.append(span_token_range(lm.tokenizer, text, ids, start, end)[1] - 1)
        rows.append(ids + (suffixes[i] if suffixes else []))
    width = max(len(r) for r in rows)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=lm.device)
    return Batch(ids, last)


def request_texts(request: EditRequest, templates: list[str]) -> list[tuple[str, tuple[int, int]]]:
    subject_start = request.prompt.index("{}")
    return [fill(template, request.text, subject_start, request.subject) for template in templates]


@torch.no_grad()
def io_at_subject(lm: LoadedModel, kind: str, layer: int, request: EditRequest, templates: list[str]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of a module ("mlp" projection or "hidden" block) at the subject's last token,
    one row per template: (n_templates, d_in), (n_templates, d_out)."""
    batch = prompt_batch(lm, request_texts(request, templates))
    n, width = batch.input_ids.shape
    with Hook(lm.arch.module(kind, layer), keep_input=True, keep_output=True, stop=True) as hook:
        lm.model(input_ids=batch.input_ids, use_cache=False)
    rows, index = torch.arange(n), torch.tensor(batch.subject_last)
    inputs = hook.input.reshape(n, width, -1)[rows, index].float().to(lm.device)  # the module's device may differ
    outputs = hook.output.reshape(n, width, -1)[rows, index].float().to(lm.device)
    return inputs, outputs
