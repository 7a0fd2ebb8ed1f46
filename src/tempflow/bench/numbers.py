"""How the benchmark tables write numbers, and the mean and spread over seeds they report."""

from __future__ import annotations

import math
import statistics


def fmt(x: float | None, digits: int = 3) -> str:
    """A table cell: '-' for a missing or NaN value, thousands grouped from 1000 on."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and population spread of `xs` (spread 0 for one value; NaN, NaN for none)."""
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.pstdev(xs) if len(xs) > 1 else 0.0)
