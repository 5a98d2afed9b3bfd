"""Progress of the phases that can take long, each announced with its total before its first step.

Library code only reports. A `Phases` reporter is called when a phase starts, with the phase's name,
total and unit, and returns the callback that receives the phase's steps. The CLI draws one bar per
phase; the server fills a job's phase, done and total. The phases of an edit, in order, each only
when it has work to do: text sampled from the model for the key statistics (when no corpus is given
and the statistics are not cached), the key statistics, the context prefixes, the optimisation.
"""

from __future__ import annotations

from typing import Callable

Step = Callable[[int], None]
Phases = Callable[[str, int, str], Step]  # (name, total, unit) -> the phase's step callback

SAMPLING = "sampling text for key statistics (no corpus given)"
STATISTICS = "key statistics"
PREFIXES = "context prefixes"
OPTIMISATION = "value optimisation"
# Phases that happen once per run (then cached), not per edit: what a long run shows bars for.
SETUP_PHASES = (SAMPLING, STATISTICS, PREFIXES)


def _ignore(n: int) -> None:
    pass


def start_phase(phases: Phases | None, name: str, total: int, unit: str) -> Step:
    """The step callback of phase `name`, which starts now; does nothing without a reporter."""
    return phases(name, total, unit) if phases is not None else _ignore


def steps_only(step: Step | None) -> Phases | None:
    """A reporter that sends every phase's steps to the one callback `step` (a caller that counts
    steps, not phases), or none without it."""
    return None if step is None else (lambda name, total, unit: step)


def on_first_step(phases: Phases | None, name: str, total: int, unit: str) -> Step:
    """Like `start_phase`, but the phase is announced at its first step: for a phase set up before work it
    waits for (the statistics count tokens only once their text exists, which may first have to be
    sampled, a phase of its own)."""
    step: Step | None = None

    def forward(n: int) -> None:
        nonlocal step
        if step is None:
            step = start_phase(phases, name, total, unit)
        step(n)

    return forward
