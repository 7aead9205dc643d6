"""Summaries of repeated measurements: median with min–max, and percentiles.

Machines here are shared and noisy, so every figure is a median over rounds with the
spread beside it, never a single sample and never a mean (one stall would drag it).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Spread:
    """Median and range of a series of measurements."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """Summarise `values` (NaN when there are none)."""
        if not values:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.median(values), min(values), max(values), len(values))

    def show(self, fmt: str = "{:.1f}") -> str:
        """'12.3 (11.0–14.2)'; just the median when all values are equal."""
        if self.n == 0:
            return "n/a"
        middle = fmt.format(self.median)
        if self.low == self.high:
            return middle
        return f"{middle} ({fmt.format(self.low)}–{fmt.format(self.high)})"

    def to_json(self) -> dict[str, float]:
        return {"median": self.median, "min": self.low, "max": self.high, "n": self.n}


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0–100) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(math.ceil(q / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def thousands(value: float) -> str:
    """'48.2k' for 48 213; plain below 10 000."""
    return f"{value / 1000:.1f}k" if value >= 10_000 else f"{value:.0f}"
