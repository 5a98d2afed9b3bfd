"""Figures without pyplot: a `matplotlib.figure.Figure` draws and saves with its own canvas, so no
backend is chosen and a notebook's stays as it is (the CLI needs no display either)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kwargs):
    """(figure, axes) as `pyplot.subplots` returns them."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(nrows, ncols, **kwargs)


def save(figure: Figure, path_stem: str | Path, *, dpi: int = 130, **kwargs) -> list[Path]:
    """Write `<stem>.png` and `<stem>.svg`; returns their paths."""
    paths = [Path(f"{path_stem}.png"), Path(f"{path_stem}.svg")]
    for path in paths:
        figure.savefig(path, dpi=dpi, **kwargs)
    return paths
