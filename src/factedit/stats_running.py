"""Running mean / variance that can be saved, loaded and merged (Chan et al.'s parallel update)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RunningMean:
    count: int = 0
    mean: np.ndarray | float = 0.0
    m2: np.ndarray | float = 0.0  # sum of squared deviations from the mean

    def add(self, value) -> None:
        value = np.asarray(value, dtype=float)
        self.merge(RunningMean(1, value, np.zeros_like(value)))

    def merge(self, other: "RunningMean") -> None:
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, np.array(other.mean, float), np.array(other.m2, float)
            return
        total = self.count + other.count
        delta = np.asarray(other.mean) - self.mean
        self.mean = self.mean + delta * other.count / total
        self.m2 = self.m2 + other.m2 + delta**2 * self.count * other.count / total
        self.count = total

    @property
    def std(self):
        return np.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else np.zeros_like(self.mean)

    @property
    def ci95(self):
        """Half-width of a normal-approximation 95% confidence interval of the mean."""
        return 1.96 * self.std / np.sqrt(max(self.count, 1))

    def state(self) -> dict:
        return {"count": self.count, "mean": np.asarray(self.mean).tolist(), "m2": np.asarray(self.m2).tolist()}

    @classmethod
    def from_state(cls, state: dict) -> "RunningMean":
        """The mean saved by state(); a ValueError where the state cannot be one (a damaged file), so
        that a reader counts it as missing instead of merging nonsense into its averages."""
        count, mean, m2 = state["count"], np.asarray(state["mean"], float), np.asarray(state["m2"], float)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"a running mean of {count!r} values")
        if mean.shape != m2.shape or not (np.isfinite(mean).all() and np.isfinite(m2).all()) or (m2 < 0).any():
            raise ValueError("a running mean whose mean and squared deviations do not fit together")
        return cls(count, mean, m2)
