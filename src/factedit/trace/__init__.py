"""Causal tracing (paper section 2): where a model recalls a fact."""

from .average import AverageResult, average_effects
from .heatmap import TraceResult, heatmap, trace
from .plot import plot_average, plot_heatmap
from .runs import prepare

__all__ = ["AverageResult", "TraceResult", "average_effects", "heatmap", "plot_average", "plot_heatmap",
           "prepare", "trace"]
