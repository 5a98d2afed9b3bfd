"""Causal-tracing heatmaps for one prompt, each cell restored exactly (the library entry point
`trace()` is in tracing.py, which also offers estimates)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError
from .restore import HEATMAP_KINDS, heatmap_cells, restored_probs
from .runs import TraceRun


@dataclass
class TraceResult:
    """One heatmap: the metric (p(answer) unless `metric` says otherwise) with each (token, layer)
    state restored, plus the run's context. `approx` names the estimate the scores are ("atp"), empty
    for exact restorations."""

    kind: str
    prompt: str
    subject: str
    tokens: list[str]
    subject_range: tuple[int, int]
    answer: str
    p_clean: float
    p_corrupt: float
    scores: np.ndarray  # (n_tokens, n_layers) the metric after restoration
    window: int
    samples: int
    noise_std: float
    seed: int
    model: str = ""
    extra: dict = field(default_factory=dict)
    corruption: str = "gaussian"
    metric: str = "prob"
    approx: str = ""

    @property
    def total_effect(self) -> float:
        return self.p_clean - self.p_corrupt

    @property
    def indirect_effects(self) -> np.ndarray:
        return self.scores - self.p_corrupt

    def peak(self) -> tuple[int, int, float]:
        """(token, layer, indirect effect) of the strongest restoration."""
        t, l = np.unravel_index(int(np.argmax(self.scores)), self.scores.shape)
        return int(t), int(l), float(self.scores[t, l] - self.p_corrupt)

    def subject_peak(self) -> tuple[int, int, float]:
        """The strongest restoration among the subject's tokens."""
        start, end = self.subject_range
        sub = self.scores[start:end]
        t, l = np.unravel_index(int(np.argmax(sub)), sub.shape)
        return int(t) + start, int(l), float(sub[t, l] - self.p_corrupt)

    def summary(self) -> str:
        t, l, effect = self.peak()
        st, sl, s_effect = self.subject_peak()
        estimated = f" (estimated, {self.approx})" if self.approx else ""
        lines = [f"{self.kind:>14}: peak at token {t} {self.tokens[t]!r}, layer {l}: "
                 f"indirect effect {effect:+.3f} (of total {self.total_effect:+.3f}){estimated}"]
        last_subject = self.subject_range[1] - 1
        if st != last_subject and s_effect > 0:
            lines.append(f"{'':>16}within the subject the fact sits on token {st} {self.tokens[st]!r} "
                         f"(layer {sl}, {s_effect:+.3f}), not on the last subject token {self.tokens[last_subject]!r}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["scores"] = self.scores.tolist()
        data["subject_range"] = list(self.subject_range)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TraceResult":
        data = dict(data)
        data["scores"] = np.asarray(data["scores"], dtype=float)
        data["subject_range"] = tuple(data["subject_range"])
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "TraceResult":
        return cls.from_dict(json.loads(Path(path).read_text()))


def heatmap(run: TraceRun, kind: str = "hidden", *, window: int = 10, max_batch_tokens: int = 2048,
            progress: Callable[[int], None] | None = None) -> TraceResult:
    """Compute one heatmap from prepared clean/corrupted runs (shared between kinds)."""
    cells = heatmap_cells(kind, run.n_tokens, run.lm.n_layers, window)
    probs = restored_probs(run, cells, max_batch_tokens=max_batch_tokens, progress=progress)
    return result_of(run, kind, window, probs.numpy().astype(float).reshape(run.n_tokens, run.lm.n_layers))


def result_of(run: TraceRun, kind: str, window: int, scores: np.ndarray, approx: str = "") -> TraceResult:
    """A TraceResult of `scores` (tokens x layers) computed from `run`."""
    tok = run.tokenized
    return TraceResult(
        kind=kind, prompt=run.prompt, subject=run.subject, tokens=tok.tokens, subject_range=tok.subject_range,
        answer=run.answer, p_clean=run.p_clean, p_corrupt=run.p_corrupt, scores=scores,
        window=window if kind in ("mlp", "attn") else 1, samples=run.samples, noise_std=run.noise_std,
        seed=run.seed, model=run.lm.name, corruption=run.corruption, metric=run.metric.name, approx=approx,
        extra={"replacements": run.replacements} if run.replacements else {},
    )


def expand_kinds(kinds: str | list[str]) -> list[str]:
    if isinstance(kinds, str):
        kinds = ["hidden", "mlp", "attn"] if kinds == "all" else kinds.split(",")
    for kind in kinds:
        if kind not in HEATMAP_KINDS:
            raise InputError(f"unknown trace kind {kind!r}; choose from all, {', '.join(HEATMAP_KINDS)}")
    return list(kinds)
