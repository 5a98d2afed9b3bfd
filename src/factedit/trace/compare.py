"""Average effects of several `trace-avg` runs side by side: another corruption, another model.

Runs of models with different depths are compared at the same relative depth (layer / (layers - 1)),
and effects as shares of each run's own total effect, since a corruption or a model sets the scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError
from .average import AverageResult, AverageSettings

COMPARED_CLASSES = ("last_subject", "last")


def read_average(out_dir: str | Path, n: int | None = None) -> AverageResult:
    """The average of a trace-avg folder's first `n` traced facts (all by default), rebuilt from
    facts.jsonl, so that a run still in progress can be read too."""
    out = Path(out_dir)
    settings_file, log = out / "settings.json", out / "facts.jsonl"
    if not settings_file.is_file() or not log.is_file():
        raise InputError(f"{out} is not a trace-avg folder: it needs settings.json and facts.jsonl "
                         "(factedit trace-avg writes them)")
    result = AverageResult(AverageSettings(**AverageSettings.with_defaults(json.loads(settings_file.read_text()))))
    for line in log.read_text().splitlines():
        if n is not None and result.n_correct >= n:
            break
        if line.strip():
            result.add(json.loads(line))
    if result.n_correct == 0:
        raise InputError(f"{out} has no traced fact yet")
    return result


def shared_kinds(runs: dict[str, AverageResult]) -> list[str]:
    """The kinds (hidden, mlp, attn) that every run traced, in the first run's order."""
    return [k for k in next(iter(runs.values())).effects if all(k in r.effects for r in runs.values())]


def describe(result: AverageResult) -> str:
    """What a run traced, in one line."""
    s = result.settings
    corruption = f"Gaussian noise {s.noise_std:.3f}" if s.corruption == "gaussian" else "subject replaced"
    estimated = f", estimates ({s.approx})" if s.approx else ""
    return (f"{s.model}, {corruption}, metric {s.metric}{estimated}: {result.n_correct} facts, total effect "
            f"{float(result.total_effect.mean):.3f} +- {float(result.total_effect.ci95):.3f}")


def comparison_markdown(runs: dict[str, AverageResult]) -> str:
    """Per kind and token class (last subject token, last token): each run's peak layer, its
    relative depth, the peak effect with its 95% CI, and the peak as a share of the run's total effect."""
    lines = [f"- **{name}**: {describe(result)}" for name, result in runs.items()]
    lines += ["", "| kind, token | run | peak layer (of) | relative depth | peak effect (95% CI) | share of total |",
              "|---|---|---|---|---|---|"]
    for kind in shared_kinds(runs):
        for token_class in COMPARED_CLASSES:
            for name, result in runs.items():
                if token_class not in result.effects[kind]:
                    continue
                layer, value = result.peak(kind, token_class)
                n_layers = len(np.asarray(result.effects[kind][token_class].mean))
                ci = float(np.asarray(result.effects[kind][token_class].ci95)[layer])
                share = value / float(result.total_effect.mean)
                lines.append(f"| {kind}, {token_class.replace('_', ' ')} | {name} | {layer} ({n_layers}) | "
                             f"{layer / max(n_layers - 1, 1):.2f} | {value:.3f} (+- {ci:.3f}) | {share:.2f} |")
    return "\n".join(lines)
