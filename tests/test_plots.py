"""Evaluation plots from hand-made summaries."""

import pytest

from factedit.evaluate.plots import plot_by_layer


def summary(layer, ns, model="m", method="rome"):
    scores = {k: {"mean": v, "ci95": 1.0, "n": 20} for k, v in (("ES", 100.0), ("PS", 95.0), ("NS", ns))}
    return {"run": f"{model}-{layer}", "model": model, "method": method, "layer": layer, "post": scores,
            "pre": {k: {"mean": 50.0, "ci95": 1.0, "n": 20} for k in ("ES", "PS", "NS")}}


def test_plot_by_layer_writes_png_and_svg_and_takes_runs_at_the_same_layer(tmp_path, monkeypatch):
    from factedit.evaluate import plots

    drawn = []  # the figure plot_by_layer saves, read back below
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, stem: drawn.append(fig) or save(fig, stem))
    runs = [summary(9, 15.0), summary(3, 40.0), summary(3, 57.0), summary(5, 60.0, model="other")]
    written = plot_by_layer(runs, tmp_path / "layers")
    assert [p.suffix for p in written] == [".png", ".svg"] and all(p.stat().st_size > 1000 for p in written)
    # One line per model and method, by layer: both runs at layer 3 are drawn at x = 3, none dropped.
    ns = drawn[0].axes[2]
    assert ns.get_title() == "NS (dashed: unedited)"
    lines = {c.get_label(): (list(c[0].get_xdata()), list(c[0].get_ydata())) for c in ns.containers}
    assert lines == {"m, rome": ([3, 3, 9], [40.0, 57.0, 15.0]), "other, rome": ([5], [60.0])}
    dashed = [line.get_ydata()[0] for line in ns.lines if line.get_linestyle() == "--"]
    assert dashed == [50.0, 50.0]  # each model's unedited score
    with pytest.raises(ValueError, match="edits no single layer"):
        plot_by_layer([{**summary(3, 40.0), "layer": None}], tmp_path / "none")


def test_a_redrawn_figure_gives_the_same_bytes(tmp_path):
    """A rerun that re-reads finished results redraws their plots: no date or random ids may change them."""
    from factedit.figures import save, subplots

    def draw(stem):
        figure, axes = subplots(figsize=(3, 2))
        axes.plot([0, 1, 2], [1, 0, 2], label="edits")
        axes.fill_between([0, 1, 2], [0, -1, 1], [2, 1, 3], alpha=0.2)
        axes.legend()
        return save(figure, tmp_path / stem)

    for first, second in zip(draw("a"), draw("b")):
        assert first.read_bytes() == second.read_bytes(), first.suffix
