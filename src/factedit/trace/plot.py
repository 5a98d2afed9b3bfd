"""Figures like the paper's: a heatmap per kind (Figure 1) and average-effect curves (Figure 2)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

from .. import figures
from .average import TOKEN_CLASSES, AverageResult
from .compare import shared_kinds
from .heatmap import TraceResult

COLORMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds", "hidden_no_mlp": "Purples",
             "hidden_no_attn": "Purples"}
TITLES = {"hidden": "single restored layer", "mlp": "restored MLP", "attn": "restored attention",
          "hidden_no_mlp": "restored layer, later MLPs severed", "hidden_no_attn": "restored layer, later attention severed"}
CLASS_LABELS = {"first_subject": "first subject token", "middle_subject": "middle subject tokens",
                "last_subject": "last subject token", "first_after": "first subsequent token",
                "further": "further tokens", "last": "last token"}


def _save(fig, path_stem: Path) -> list[Path]:
    return figures.save(fig, Path(path_stem).with_suffix(""), dpi=130, bbox_inches="tight")


def plot_heatmap(result: TraceResult, path_stem: str | Path) -> list[Path]:
    """Rows are tokens (subject tokens starred), columns layers, colour the metric after restoring
    (p(answer) by default); estimates (result.approx) and other corruptions say so in the title."""
    n_tokens, n_layers = result.scores.shape
    fig, ax = figures.subplots(figsize=(3.5 + n_layers * 0.12, 1.2 + n_tokens * 0.3))
    image = ax.pcolor(result.scores, cmap=COLORMAPS.get(result.kind, "Purples"), vmin=result.p_corrupt)
    ax.invert_yaxis()
    start, end = result.subject_range
    labels = [f"{tok!r}*" if start <= i < end else repr(tok) for i, tok in enumerate(result.tokens)]
    ax.set_yticks(np.arange(n_tokens) + 0.5, labels, fontsize=8)
    step = max(1, n_layers // 10)
    ax.set_xticks(np.arange(0, n_layers, step) + 0.5, [str(i) for i in range(0, n_layers, step)], fontsize=8)
    window = f" (window {result.window})" if result.kind in ("mlp", "attn") else ""
    how = ([f"estimate ({result.approx})"] if result.approx else []) + \
        (["subject replaced"] if result.corruption == "replace" else [])
    ax.set_title(f"Impact of {TITLES.get(result.kind, result.kind)}{window}"
                 + (f"\n{', '.join(how)}" if how else ""), fontsize=10)
    ax.set_xlabel(f"layer  (model {result.model})", fontsize=9)
    bar = fig.colorbar(image)
    bar.ax.set_title(f"p({result.answer.strip()})" if result.metric == "prob" else "logit diff", fontsize=8)
    return _save(fig, Path(path_stem))


def plot_average(result: AverageResult, path_stem: str | Path) -> list[Path]:
    """One panel per kind: average indirect effect per layer for each token class, with 95% CIs."""
    kinds = list(result.effects)
    fig, axes = figures.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 3.6), squeeze=False)
    colors = matplotlib.colormaps["tab10"]
    for ax, kind in zip(axes[0], kinds):
        for i, name in enumerate(TOKEN_CLASSES):
            stats = result.effects[kind].get(name)
            if stats is None:
                continue
            mean, ci = np.asarray(stats.mean), np.asarray(stats.ci95)
            layers = np.arange(len(mean))
            ax.plot(layers, mean, color=colors(i), label=CLASS_LABELS[name])
            ax.fill_between(layers, mean - ci, mean + ci, color=colors(i), alpha=0.15)
        ax.set_title(f"Average indirect effect: {TITLES.get(kind, kind)}", fontsize=9)
        ax.set_xlabel("layer")
        ax.axhline(0, color="gray", lw=0.5)
    axes[0][0].set_ylabel("p(restored) - p(corrupted)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{result.settings.model}: {result.n_correct} known facts, total effect "
                 f"{float(result.total_effect.mean):.3f}", fontsize=10)
    return _save(fig, Path(path_stem))


def plot_comparison(runs: dict[str, AverageResult], path_stem: str | Path) -> list[Path]:
    """One panel per kind: each run's average effect at the last subject token (solid) and the last
    token (dashed), as a share of that run's total effect, against relative depth."""
    kinds = shared_kinds(runs)
    fig, axes = figures.subplots(1, len(kinds), figsize=(4.8 * len(kinds), 3.8), squeeze=False)
    colors = matplotlib.colormaps["tab10"]
    for ax, kind in zip(axes[0], kinds):
        for i, (name, result) in enumerate(runs.items()):
            total = float(result.total_effect.mean)
            for token_class, style in (("last_subject", "-"), ("last", "--")):
                stats = result.effects[kind].get(token_class)
                if stats is None:
                    continue
                mean = np.asarray(stats.mean) / total
                depth = np.arange(len(mean)) / max(len(mean) - 1, 1)
                ax.plot(depth, mean, style, color=colors(i), label=f"{name}, {CLASS_LABELS[token_class]}")
        ax.set_title(TITLES.get(kind, kind), fontsize=9)
        ax.set_xlabel("relative depth (layer / (layers - 1))")
        ax.axhline(0, color="gray", lw=0.5)
    axes[0][0].set_ylabel("indirect effect / total effect")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Average indirect effects compared (solid: last subject token, dashed: last token)", fontsize=10)
    return _save(fig, Path(path_stem))
