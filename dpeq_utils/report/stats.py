"""Uncertainty: Student-t intervals over seeds (scipy), binomial intervals of a single run, and
how a percentage is written.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

STAMP = "pipeline check on tiny synthetic data: not a result"


def mean_interval(values) -> tuple[float, float]:
    """Mean of ``values`` (runs that differ only in their seed) and the half-width of its 95 %
    Student-t interval (``scipy.stats.t.interval``); at least two values.

    >>> mean, half = mean_interval([0.30, 0.32, 0.34]); round(mean, 2), round(half, 4)
    (0.32, 0.0497)
    """
    values = np.asarray(values, dtype=float)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    return float(values.mean()), float(high - low) / 2


def paired_interval(values, others) -> tuple[float, float]:
    """Mean of ``values - others`` (paired by seed) and the half-width of its 95 % interval: the
    paired t-test's (``scipy.stats.ttest_rel(...).confidence_interval()``)."""
    values, others = np.asarray(values, dtype=float), np.asarray(others, dtype=float)
    low, high = stats.ttest_rel(values, others).confidence_interval(0.95)
    return float((values - others).mean()), float(high - low) / 2


def runs_interval(values, test_size: float) -> tuple[float, float, float]:
    """(mean, std, 95 % half-width) of runs that differ only in their seed: Student-t over the runs,
    or for a single run the binomial error of its accuracy on ``test_size`` test examples."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) > 1:
        return mean, float(values.std(ddof=1)), mean_interval(values)[1]
    return mean, math.sqrt(max(mean * (1 - mean), 0.0) / test_size), float(binomial_ci95(mean, test_size))


def summarise(table: pd.DataFrame, by: list[str], value: str = "test_accuracy_ema") -> pd.DataFrame:
    """Mean, std, runs and the 95 % interval's half-width of ``value`` per group of ``by``."""
    rows = []
    for keys, part in table.groupby(by, sort=False, dropna=False):
        values = part[value].astype(float).to_numpy()
        mean, std, half = runs_interval(values, float(part["test_size"].iloc[0]))
        row = dict(zip(by, keys if isinstance(keys, tuple) else (keys,)))
        row.update({"mean": mean, "std": std, "runs": len(values), "ci95": half})
        rows.append(row)
    return pd.DataFrame(rows)


def percent(mean: float, half: float | None = None) -> str:
    """``'31.2 %'`` or ``'31.2 ± 1.4 %'``.

    >>> percent(0.3124, 0.0141)
    '31.2 ± 1.4 %'
    """
    return f"{100 * mean:.1f} %" if half is None else f"{100 * mean:.1f} ± {100 * half:.1f} %"


def binomial_ci95(accuracy, size):
    """Half-width of the 95 % normal-approximation interval of an accuracy measured on ``size`` examples."""
    return 1.96 * np.sqrt(accuracy * (1 - accuracy) / size)


def verdict_words(interval: dict, higher: str = "higher than", lower: str = "lower than",
                  neither: str = "not distinguishable from") -> str:
    """Where a difference's 95 % interval lies against 0, in words: ``higher`` when all of it is above,
    ``lower`` when all of it is below, ``neither`` when it includes 0. Every generated sentence that
    compares two numbers decides with this, from the interval, never from the point estimate.

    >>> verdict_words({"mean": 0.05, "ci95": 0.02}), verdict_words({"mean": 0.05, "ci95": 0.08})
    ('higher than', 'not distinguishable from')
    >>> verdict_words({"mean": -0.05, "ci95": 0.02})
    'lower than'
    """
    return (higher if interval["mean"] - interval["ci95"] > 0 else
            lower if interval["mean"] + interval["ci95"] < 0 else neither)


def points(interval: dict) -> str:
    """``'+1.2 ± 3.4 points'`` from an interval's mean and half-width (fractions)."""
    return f"{100 * interval['mean']:+.1f} ± {100 * interval['ci95']:.1f} points"


def mean_cell(values: list[float], test_size: int) -> str:
    """Mean ± 95 % of runs that differ only in their seed (binomial for one run), or '—' for none."""
    if not values:
        return "—"
    mean, _, half = runs_interval(values, test_size)
    return percent(mean, half)
