"""A guard on lifelong editing: a batch is kept only if the model it leaves is still the model.

Lifelong editors can ruin a model a batch at a time (docs/results.md#lifelong): perplexity climbs and
the facts it knew are lost, and nothing in an editing tool says so until someone measures. A guard
measures a small probe before and after each batch, on the model with the batch applied but not yet
kept: the perplexity of held-out text and the known facts the model answers (besides those about
the subjects the batch edits). When the batch costs
more than the limits allow (perplexity after / before above `perplexity`, or fewer than `known` of
the facts answered before still answered after), the batch is refused: reverted, nothing saved, the
model and the history exactly as they were, and GuardRefused says what it would have cost.

    guard = Guard(lm, GuardLimits(perplexity=1.05, known=0.98), held_out=held_out_corpus(corpus),
                  known=load_known_facts())
    delta, diagnostics, cost = guard.edit(history, requests, "alphaedit", settings)

`factedit history edit --guard perplexity=1.05 --guard known=0.98` is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.known import KnownFact
from ..edit.history import EditHistory
from ..errors import FacteditError, InputError
from ..models import LoadedModel
from ..stats import Corpus
from .lifelong import answered, perplexity, untouched_facts

LIMITS = {"perplexity": "the largest perplexity after / before the batch (e.g. 1.05)",
          "known": "the smallest share of the known facts answered before the batch still answered after (e.g. 0.98)"}


class GuardRefused(FacteditError):
    """The batch cost more than the guard's limits; nothing was kept. `cost`: what it would have cost."""

    def __init__(self, message: str, cost: "BatchCost"):
        super().__init__(message)
        self.cost = cost


@dataclass(frozen=True)
class GuardLimits:
    perplexity: float | None = None  # maximum perplexity ratio after / before the batch
    known: float | None = None  # minimum share of the answered known facts kept

    def __post_init__(self):
        if self.perplexity is not None and not self.perplexity >= 1.0:
            raise InputError(f"the perplexity limit is a ratio after / before a batch, at least 1, not {self.perplexity}")
        if self.known is not None and not 0.0 < self.known <= 1.0:
            raise InputError(f"the known-facts limit is a share of the facts kept, in (0, 1], not {self.known}")
        if self.perplexity is None and self.known is None:
            raise InputError("a guard needs a limit: perplexity=RATIO and/or known=SHARE")

    @classmethod
    def parse(cls, specs: list[str] | tuple[str, ...]) -> "GuardLimits":
        """From "perplexity=1.05", "known=0.98" (the command line's --guard values)."""
        values = {}
        for spec in specs:
            name, _, number = spec.partition("=")
            name = name.strip()
            if name not in LIMITS or not number.strip():
                raise InputError(f"--guard {spec!r}: give NAME=NUMBER with NAME one of "
                                 + "; ".join(f"{n} ({what})" for n, what in LIMITS.items()))
            if name in values:
                raise InputError(f"--guard {name} is given twice")
            try:
                values[name] = float(number)
            except ValueError:
                raise InputError(f"--guard {spec!r}: {number.strip()!r} is not a number") from None
        return cls(**values)


@dataclass(frozen=True)
class Probe:
    perplexity: float | None
    answered: tuple[bool, ...]  # per probe fact


@dataclass(frozen=True)
class BatchCost:
    """What one batch did to the probe."""

    perplexity_before: float | None
    perplexity_after: float | None
    known_before: int  # probe facts answered before the batch
    known_still: int  # of them, answered after it

    @property
    def perplexity_ratio(self) -> float | None:
        if self.perplexity_before is None:
            return None
        return self.perplexity_after / self.perplexity_before

    @property
    def known_kept(self) -> float | None:
        return self.known_still / self.known_before if self.known_before else None

    def over(self, limits: GuardLimits) -> list[str]:
        """The limits this cost breaks, in words (none: the batch may stay)."""
        broken = []
        ratio, kept = self.perplexity_ratio, self.known_kept
        if limits.perplexity is not None and ratio is not None and not ratio <= limits.perplexity:
            broken.append(f"perplexity x{ratio:.3f} ({self.perplexity_before:.2f} -> {self.perplexity_after:.2f}), "
                          f"limit x{limits.perplexity:g}")
        if limits.known is not None and kept is not None and not kept >= limits.known:
            broken.append(f"known facts kept {self.known_still} of {self.known_before} ({kept:.3f}), "
                          f"limit {limits.known:g}")
        return broken

    def describe(self) -> str:
        parts = []
        if self.perplexity_ratio is not None:
            parts.append(f"perplexity x{self.perplexity_ratio:.3f} ({self.perplexity_before:.2f} -> "
                         f"{self.perplexity_after:.2f})")
        if self.known_before:
            parts.append(f"known facts kept {self.known_still} of {self.known_before}")
        return ", ".join(parts)


class Guard:
    """Limits and the probe they are measured on (held-out text for perplexity; known facts, of which
    those the model answers when a batch begins count). A limit that cannot be measured is refused
    when the guard is made: a perplexity limit without text, a known-facts limit without facts or
    with none the model answers."""

    def __init__(self, lm: LoadedModel, limits: GuardLimits, *, held_out: Corpus | None = None,
                 known: list[KnownFact] | None = None, perplexity_tokens: int = 2048, max_facts: int = 200):
        self.lm, self.limits, self.held_out, self.tokens = lm, limits, held_out, perplexity_tokens
        self.facts = list(known or [])[:max_facts] if limits.known is not None else []
        if limits.perplexity is not None and held_out is None:
            raise InputError("a perplexity guard needs held-out text (the statistics corpus's last documents: give "
                             "--corpus or --held-out)")
        if limits.known is not None:
            if not self.facts:
                raise InputError("a known-facts guard needs known facts (--known, or $FACTEDIT_DATA_DIR/known_1000.json)")
            if not any(answered(lm, self.facts)):
                raise InputError(f"a known-facts guard needs facts the model answers: it answers none of the "
                                 f"{len(self.facts)} given")

    def measure(self, facts: list[KnownFact]) -> Probe:
        ppl = (perplexity(self.lm, self.held_out, self.tokens) if self.limits.perplexity is not None else None)
        return Probe(ppl, tuple(answered(self.lm, facts)) if facts else ())

    def cost(self, before: Probe, after: Probe) -> BatchCost:
        kept = [a for b, a in zip(before.answered, after.answered) if b]
        return BatchCost(before.perplexity, after.perplexity, len(kept), sum(kept))

    def edit(self, history: EditHistory, requests, method: str, settings=None, **kwargs):
        """history.edit(requests, method, settings, **kwargs) under the guard: returns (delta,
        diagnostics, cost); GuardRefused (the history and the model as they were) when the batch
        costs more than the limits."""
        facts = untouched_facts(self.facts, requests)
        before = self.measure(facts)
        found: list[BatchCost] = []

        def check(delta) -> None:
            cost = self.cost(before, self.measure(facts))
            found.append(cost)
            broken = cost.over(self.limits)
            if broken:
                raise GuardRefused(f"the guard refused the batch of {len(delta.requests)} edit(s): "
                                   f"{'; '.join(broken)}; the model and the history are as they were", cost)
            delta.info["guard"] = {"perplexity_ratio": cost.perplexity_ratio, "known_kept": cost.known_kept}

        delta, diagnostics = history.edit(requests, method, settings, check=check, **kwargs)
        return delta, diagnostics, found[-1]
