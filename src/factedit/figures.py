"""Figures without pyplot: a `matplotlib.figure.Figure` draws and saves with its own canvas, so no
backend is chosen and a notebook's stays as it is (the CLI needs no display either)."""

from __future__ import annotations

from pathlib import Path

from matplotlib import rc_context
from matplotlib.figure import Figure


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kwargs):
    """(figure, axes) as `pyplot.subplots` returns them."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(nrows, ncols, **kwargs)


def save(figure: Figure, path_stem: str | Path, *, dpi: int = 130, **kwargs) -> list[Path]:
    """Write `<stem>.png` and `<stem>.svg`; returns their paths. The same figure gives the same bytes
    (no date in the SVG, fixed SVG element ids), so a redrawn plot of unchanged results is no change
    in git."""
    paths = [Path(f"{path_stem}.png"), Path(f"{path_stem}.svg")]
    with rc_context({"svg.hashsalt": "factedit"}):
        figure.savefig(paths[0], dpi=dpi, **kwargs)
        figure.savefig(paths[1], dpi=dpi, metadata={"Date": None}, **kwargs)
    return paths
