"""Small statistics the reports need: an interval for a rate, a correlation.

Written out rather than taken from scipy/statsmodels: two formulas do not
justify a dependency of that size in a tool that installs on a laptop.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a rate of ``successes`` in ``n`` trials (a tie
    may count half). Unlike the normal approximation it stays inside [0, 1] and is
    honest for the small counts a solo researcher has: 7 of 12 is 0.32 to 0.81."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate_text(rate: float | None, n: int, unit: str = "pairs", *, independent: int | None = None) -> str:
    """'0.58 on 12 pairs (95% CI 0.32-0.81)', or '- on 0 pairs' when there is nothing
    to judge. ``independent``: how many independent draws the ``n`` trials come
    from (the pairs of one best-of-K comparison share their winner, so they are
    not K-1 draws); the interval is then as wide as that count makes it."""
    if rate is None or n == 0 or rate != rate:
        return f"- on 0 {unit}"
    draws = independent if independent and independent < n else n
    low, high = wilson_interval(rate * draws, draws)
    source = f" from {draws} comparisons" if draws != n else ""
    return f"{rate:.2f} on {n} {unit}{source} (95% CI {low:.2f}-{high:.2f})"


def correlation(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson's r, or None when it is undefined (fewer than 3 points, or one side
    constant)."""
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return statistics.correlation(list(map(float, xs)), list(map(float, ys)))
