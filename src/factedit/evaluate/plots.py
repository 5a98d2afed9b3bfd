"""Plots of evaluation summaries (as `runner.summarize` writes them): scores per run, and scores
against the number of edits a model holds (mass editing)."""

from __future__ import annotations

from pathlib import Path

from .. import figures
from ..errors import InputError


def _save(fig, path_stem: str | Path) -> list[Path]:
    return figures.save(fig, path_stem, dpi=120)


def plot_score_bars(summaries: list[dict], path_stem: str | Path, keys: tuple[str, ...] = ("ES", "PS", "NS")) -> list[Path]:
    """Grouped bars with 95% CIs: the unedited model (the first run's "pre"), then each run."""
    rows = [("unedited", summaries[0]["pre"])] + [(s.get("run") or s["method"], s["post"]) for s in summaries]
    fig, ax = figures.subplots(figsize=(1.2 + 0.9 * len(rows) * len(keys) / 3, 3.6))
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        xs = [i + (k - (len(keys) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [scores[key]["mean"] if key in scores else 0 for _, scores in rows], width,
               yerr=[(scores[key]["ci95"] or 0) if key in scores else 0 for _, scores in rows], capsize=2, label=key)
    ax.set_xticks(range(len(rows)), [label for label, _ in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("score (%)")
    ax.legend(fontsize=8, ncol=len(keys))
    fig.tight_layout()
    return _save(fig, path_stem)


def plot_by_number_of_edits(summaries: list[dict], path_stem: str | Path,
                            keys: tuple[str, ...] = ("ES", "PS", "NS")) -> list[Path]:
    """Scores against the number of edits a model holds, one line per method, from runs that edit
    their N cases together (`--edits-per-batch N`) or one after another (`--sequential`, scored
    after all edits). Writes PNG and SVG."""
    fig, axes = figures.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), sharey=True)
    by_method: dict[str, list[tuple[int, dict]]] = {}
    for s in summaries:
        label = f"{s['method']} ({'one after another' if 'final' in s else 'all at once'})"
        by_method.setdefault(label, []).append((s["cases"], s.get("final", s["post"])))
    by_method["unedited (same records)"] = list({s["cases"]: (s["cases"], s["pre"]) for s in summaries}.values())
    for ax, key in zip(axes, keys):
        for label, points in by_method.items():
            points = sorted((n, scores[key]) for n, scores in points if key in scores)
            style = {"color": "grey", "linestyle": "--"} if label.startswith("unedited") else {}
            ax.errorbar([n for n, _ in points], [v["mean"] for _, v in points],
                        yerr=[v["ci95"] or 0 for _, v in points], marker="o", capsize=3, label=label, **style)
        ax.set_xscale("log")
        ax.set_xlabel("number of edits held by the model")
        ax.set_title(key)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("score (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path_stem)


def plot_by_layer(summaries: list[dict], path_stem: str | Path, keys: tuple[str, ...] = ("ES", "PS", "NS")) -> list[Path]:
    """Scores against the edited layer (the top one for methods that edit several), one line per
    model and method, with each model's unedited score dashed: where along the depth an editor
    writes the fact and where it starts to damage neighbours. Writes PNG and SVG."""
    fig, axes = figures.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), sharey=True)
    lines: dict[str, list[tuple[int, dict]]] = {}
    unedited: dict[str, dict] = {}
    for s in summaries:
        if s.get("layer") is None:
            raise InputError(f"run {s.get('run')} edits no single layer; plot it by run instead")
        lines.setdefault(f"{s['model']}, {s['method']}", []).append((s["layer"], s["post"]))
        unedited.setdefault(s["model"], s["pre"])
    for ax, key in zip(axes, keys):
        for label, points in lines.items():
            points = sorted(((layer, scores[key]) for layer, scores in points if key in scores),
                            key=lambda point: point[0])
            drawn = ax.errorbar([x for x, _ in points], [v["mean"] for _, v in points],
                                yerr=[v["ci95"] or 0 for _, v in points], marker="o", capsize=3, label=label)
            model = label.split(",")[0]
            if key in unedited[model]:
                ax.axhline(unedited[model][key]["mean"], color=drawn[0].get_color(), linestyle="--", linewidth=1)
        ax.set_xlabel("edited layer")
        ax.set_title(f"{key} (dashed: unedited)")
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("score (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path_stem)
