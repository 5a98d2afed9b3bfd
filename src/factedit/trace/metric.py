"""What a trace measures at the last position: the answer's probability (the paper) or a logit
difference (Zhang & Nanda 2024, arXiv 2309.16042: the answer's logit minus a contrast token's).

The contrast of `logit-diff` is what the corrupted model would say instead: under token replacement,
the first token of the replacement subject's own answer (one per noise sample); under Gaussian noise,
which has no counterfactual answer, the corrupted run's most likely token other than the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError

METRICS = ("prob", "logit-diff")


def check_metric(name: str) -> str:
    if name not in METRICS:
        raise InputError(f"unknown trace metric {name!r}; choose from {', '.join(METRICS)}")
    return name


@dataclass(frozen=True)
class Metric:
    name: str  # "prob" or "logit-diff"
    answer_id: int
    contrast_ids: tuple[int, ...] = ()  # logit-diff: one per noise sample (or one for all)

    def values(self, logits: torch.Tensor, samples: int) -> torch.Tensor:
        """The metric for each row of last-position `logits` (rows, vocab), rows ordered
        sample-major (row n * k + j is noise sample n), so that each row meets its sample's contrast.
        At least float32, on the logits' device; differentiable."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.name == "prob":
            return torch.softmax(logits, dim=-1)[:, self.answer_id]
        contrast = torch.tensor(self.contrast_ids, device=logits.device)
        per_row = contrast.repeat_interleave(logits.shape[0] // samples) if len(contrast) == samples else \
            contrast.expand(logits.shape[0])
        return logits[:, self.answer_id] - logits.gather(1, per_row[:, None])[:, 0]

    @property
    def label(self) -> str:
        return "p(answer)" if self.name == "prob" else "logit(answer) - logit(contrast)"


def contrast_from_corrupted(logits: torch.Tensor, answer_id: int) -> tuple[int, ...]:
    """The token other than the answer that the corrupted run (rows = noise samples) finds most
    likely on average: Gaussian noise's contrast for `logit-diff`."""
    mean = torch.softmax(logits.float(), dim=-1).mean(0)
    mean[answer_id] = -1.0
    return (int(mean.argmax()),)
