"""Confidence intervals: percentile bootstrap over samples, with a fixed seed so reruns agree."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def bootstrap_ci(
    data: np.ndarray,
    statistic: Callable[[np.ndarray], float],
    reps: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    basic: bool = False,
) -> tuple[float, float]:
    """Bootstrap interval of `statistic` over resamples (with replacement) of the rows of data.

    `basic=True` gives the reverse-percentile ("basic") interval [2 T - q_hi, 2 T - q_lo], which
    corrects for a statistic's bias to first order: Frechet distances are biased upward, and a
    plain percentile interval of one would sit entirely above the true value.
    """
    rng = np.random.default_rng(seed)
    n = len(data)
    stats = np.array([statistic(data[rng.integers(0, n, n)]) for _ in range(reps)])
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    if basic:
        t = statistic(data)
        return float(2 * t - hi), float(2 * t - lo)
    return float(lo), float(hi)


def mean_ci(values: np.ndarray, reps: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean with a percentile-bootstrap interval, vectorised (the mean of resampled rows)."""
    rng = np.random.default_rng(seed)
    n = len(values)
    idx = rng.integers(0, n, (reps, n))
    means = values[idx].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(values.mean()), float(lo), float(hi)
