"""What many edits in a row do to the rest of a model, measured after every batch.

* edits kept: of all the edits applied so far, the share whose new object still beats the true one
  on its rewrite prompt (an early edit can be undone by later ones);
* perplexity of held-out text;
* known facts kept: of the known facts (known_1000) that the unedited model answers (its most
  likely next token starts the answer) and whose subject no edit of the run touches, the share
  still answered;
* norm growth: ||W|| / ||W unedited|| (Frobenius) of every edited weight matrix, which later work
  (e.g. ENCORE, arXiv 2502.01636) names as the cause of a model's collapse after many edits.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..data.known import KnownFact
from ..edit.history import EditHistory
from ..models import LoadedModel
from ..placement import read_weight
from ..request import EditRequest
from ..scoring import target_logprobs, teacher_forced_predictions
from ..stats import Corpus, token_chunks
from .metrics import wilson_interval


@dataclass
class LifelongPoint:
    batch: int  # batches applied (0: the unedited model)
    n_edits: int
    edits_kept: float | None  # None before the first edit
    perplexity: float | None  # None without held-out text
    known_kept: float | None  # None without known facts
    known_count: int  # the known facts that count (answered by the unedited model, untouched by the run)
    norm_growth: dict[str, float] = field(default_factory=dict)  # module -> ||W|| / ||W unedited||
    seconds: float = 0.0  # time this measurement took

    @classmethod
    def from_dict(cls, data: dict) -> "LifelongPoint":
        return cls(**data)


@torch.no_grad()
def perplexity(lm: LoadedModel, corpus: Corpus, n_tokens: int = 4096, chunk_len: int = 256) -> float:
    total_nll, count = 0.0, 0
    for chunk in token_chunks(lm, corpus, n_tokens, chunk_len):
        ids = torch.tensor([chunk], device=lm.device)
        logits = lm.model(input_ids=ids, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:].to(logits.device), reduction="sum")
        total_nll += float(nll)
        count += ids.shape[1] - 1
    mean = total_nll / max(count, 1)
    return math.exp(mean) if mean < 700 else float("inf")  # a collapsed model: report inf, do not crash


def edits_kept(lm: LoadedModel, requests: list[EditRequest], batch_size: int = 32) -> float | None:
    """Share of `requests` whose new object is more likely than the true one on the rewrite prompt
    (requests without a true object count when the new object is the most likely next token)."""
    if not requests:
        return None
    kept = []
    with_true = [r for r in requests if r.target_true]
    if with_true:
        prompts = [r.text for r in with_true]
        p_new = target_logprobs(lm, prompts, [r.target_new for r in with_true], batch_size)
        p_true = target_logprobs(lm, prompts, [r.target_true for r in with_true], batch_size)
        kept += (p_new > p_true).tolist()
    without = [r for r in requests if not r.target_true]
    if without:
        kept += [p[:1] == t[:1] for p, t in teacher_forced_predictions(lm, [r.text for r in without],
                                                                        [r.target_new for r in without])]
    return sum(kept) / len(kept)


def answered(lm: LoadedModel, facts: list[KnownFact], batch_size: int = 32) -> list[bool]:
    """Whether the model's most likely next token after each fact's prompt is the answer's first token."""
    found = []
    for start in range(0, len(facts), batch_size):
        chunk = facts[start:start + batch_size]
        found += [p[:1] == t[:1] for p, t in
                  teacher_forced_predictions(lm, [f.prompt for f in chunk], [" " + f.attribute.strip() for f in chunk])]
    return found


def untouched_facts(facts: list[KnownFact], requests: list[EditRequest]) -> list[KnownFact]:
    """The facts whose subject none of the requests edits (a fact about an edited subject may change:
    that is the edit, not a cost)."""
    touched = {r.subject.strip().lower() for r in requests}
    return [f for f in facts if f.subject.strip().lower() not in touched]


class LifelongProbe:
    """Measures the model after each batch (`measure`). Made on the unedited model: that is when it
    finds the known facts that count."""

    def __init__(self, lm: LoadedModel, run_requests: list[EditRequest], *, held_out: Corpus | None = None,
                 known: list[KnownFact] | None = None, ppl_tokens: int = 4096):
        self.lm, self.held_out, self.ppl_tokens = lm, held_out, ppl_tokens
        untouched = untouched_facts(known or [], run_requests)
        self.known = [f for f, ok in zip(untouched, answered(lm, untouched)) if ok] if untouched else []
        self.use_known = known is not None

    def measure(self, history: EditHistory, batch: int, requests_so_far: list[EditRequest]) -> LifelongPoint:
        began = time.perf_counter()
        known_kept = None
        if self.use_known and self.known:
            known_kept = sum(answered(self.lm, self.known)) / len(self.known)
        norms = {}
        for name, original in history.stack.originals().items():
            weight = read_weight(self.lm.model.get_submodule(name))
            norms[name] = round(float(weight.detach().float().norm() / original.float().norm()), 6)
        return LifelongPoint(batch, len(requests_so_far), edits_kept(self.lm, requests_so_far),
                             perplexity(self.lm, self.held_out, self.ppl_tokens) if self.held_out else None,
                             known_kept, len(self.known), norms, round(time.perf_counter() - began, 2))


def points_to_dicts(points: list[LifelongPoint]) -> list[dict]:
    return [asdict(p) for p in points]


def plot_lifelong(runs: dict[str, list[LifelongPoint]], path_stem: str | Path) -> list[Path]:
    """Edits kept, held-out perplexity, known facts kept and the largest norm growth against the
    number of edits, one line per run; shares with their 95% (Wilson) bands."""
    import matplotlib.ticker

    from .. import figures

    fig, axes = figures.subplots(1, 4, figsize=(18, 3.6), gridspec_kw={"wspace": 0.35})
    # (label, value, how many it is a share of (for a 95% band), y limits, scale)
    panels = [("edits kept (ES so far)", lambda p: p.edits_kept, lambda p: p.n_edits, (-0.05, 1.05), "linear"),
              ("held-out perplexity", lambda p: p.perplexity, None, None, "log"),
              ("known facts kept", lambda p: p.known_kept, lambda p: p.known_count, (-0.05, 1.05), "linear"),
              ("largest ||W|| / ||W unedited||", lambda p: max(p.norm_growth.values(), default=1.0), None, None,
               "linear")]
    for ax, (label, value, count, ylim, scale) in zip(axes, panels):
        for name, points in runs.items():
            shown = [p for p in points if value(p) is not None]
            if not shown:
                continue
            line, = ax.plot([p.n_edits for p in shown], [value(p) for p in shown], marker="o", label=name)
            if count is not None:
                band = [wilson_interval(value(p), count(p)) for p in shown]
                ax.fill_between([p.n_edits for p in shown], *zip(*band), color=line.get_color(), alpha=0.15)
        ax.set(xlabel="edits applied", ylabel=label, yscale=scale)
        if scale == "log":  # plain numbers (22, 25, 30), not powers of ten; minor ticks named on a narrow range only
            plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
            low, high = ax.get_ylim()
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain if high < 10 * low else matplotlib.ticker.NullFormatter())
        if ylim:
            ax.set_ylim(*ylim)
    axes[0].legend()
    return figures.save(fig, Path(path_stem), dpi=130, bbox_inches="tight")
