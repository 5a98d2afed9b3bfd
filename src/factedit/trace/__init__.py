"""Causal tracing (paper section 2): where a model recalls a fact."""

from .average import AverageResult, average_effects
from .heatmap import TraceResult, heatmap
from .plot import plot_average, plot_heatmap
from .runs import prepare
from .tracing import heatmaps, trace

__all__ = ["AverageResult", "TraceResult", "average_effects", "heatmap", "heatmaps", "plot_average", "plot_heatmap",
           "prepare", "trace"]
