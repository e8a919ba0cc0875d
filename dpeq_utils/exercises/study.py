"""Checks for the exercises of notebooks 04–06 (the evidence study): a paired Student-t interval by
hand (04), the Welch interval of a privacy cost (05), and the noise DP-SGD adds per step where only
some coordinates are updated (06). Each check runs the student's function on inputs of its own and
compares it with the package's implementation; its messages name the usual mistakes.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from . import checker

#: Seeds' accuracies the checks feed to interval functions: three pairs that move together (pairing
#: helps), four pairs that do not, and unequal groups for Welch.
_PAIRS = [([0.334, 0.331, 0.362], [0.426, 0.438, 0.422]), ([0.55, 0.54, 0.56, 0.555], [0.57, 0.58, 0.545, 0.56]),
          ([0.30, 0.35], [0.32, 0.33])]
_GROUPS = [([0.6685, 0.6435], [0.555, 0.546, 0.537, 0.554]), ([0.702, 0.692, 0.70, 0.71], [0.578, 0.577, 0.551, 0.543]),
           ([0.61, 0.62, 0.58], [0.40, 0.45])]


def _close(actual, expected, what: str, rel: float = 1e-6) -> None:
    assert actual is not None and np.isfinite(float(actual)), f"{what} is {actual!r}, not a number"
    assert math.isclose(float(actual), float(expected), rel_tol=rel, abs_tol=1e-12), \
        f"{what} is {float(actual):.6g}, expected {float(expected):.6g}"


@checker("the paired Student-t interval by hand")
def check_paired_interval(paired_t_interval) -> None:
    """``paired_t_interval(values, others) -> (mean, half)``: the mean of the per-seed differences and
    the half-width of their 95 % Student-t interval (n − 1 degrees of freedom)."""
    for values, others in _PAIRS:
        got = paired_t_interval(list(values), list(others))
        assert isinstance(got, (tuple, list)) and len(got) == 2, "return a pair (mean, half-width)"
        mean, half = (float(x) for x in got)
        d = np.subtract(values, others)
        n = len(d)
        _close(mean, d.mean(), f"the mean difference for {n} seeds")
        right = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
        if math.isclose(half, 1.96 * d.std(ddof=1) / math.sqrt(n), rel_tol=1e-4):
            raise AssertionError(f"with {n} seeds use Student's t quantile with {n - 1} degrees of freedom, not 1.96")
        if math.isclose(half, stats.t.ppf(0.975, n - 1) * d.std(ddof=0) / math.sqrt(n), rel_tol=1e-6):
            raise AssertionError("the standard deviation of a sample divides by n − 1 (ddof=1), not n")
        welch = stats.ttest_ind(values, others, equal_var=False).confidence_interval(0.95)
        if math.isclose(half, (welch.high - welch.low) / 2, rel_tol=1e-6):
            raise AssertionError("that is the unpaired (Welch) interval: pair the runs by seed and work with the "
                                 "per-seed differences")
        _close(half, right, f"the half-width for {n} seeds")


@checker("the privacy cost with its Welch interval")
def check_privacy_cost(privacy_cost) -> None:
    """``privacy_cost(non_private, private) -> {"mean", "ci95", "df"}``: mean non-private minus mean
    private accuracy, the half-width of its 95 % Welch interval and the Welch–Satterthwaite degrees of
    freedom."""
    for public, private in _GROUPS:
        got = privacy_cost(list(public), list(private))
        assert isinstance(got, dict) and {"mean", "ci95", "df"} <= set(got), 'return a dict with "mean", "ci95" and "df"'
        a, b = np.asarray(public), np.asarray(private)
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
        _close(got["mean"], a.mean() - b.mean(), "the cost (non-private minus private)")
        if math.isclose(float(got["df"]), len(a) + len(b) - 2, rel_tol=1e-9) and not math.isclose(df, len(a) + len(b) - 2):
            raise AssertionError("n₁ + n₂ − 2 degrees of freedom belong to Student's pooled test, which assumes equal "
                                 "variances; Welch's come from the two variances of the means (Welch–Satterthwaite)")
        _close(got["df"], df, f"the degrees of freedom ({len(a)} and {len(b)} runs)")
        if math.isclose(float(got["ci95"]), 1.96 * math.sqrt(va + vb), rel_tol=1e-4):
            raise AssertionError("use Student's t quantile at the Welch–Satterthwaite degrees of freedom, not 1.96")
        _close(got["ci95"], stats.t.ppf(0.975, df) * math.sqrt(va + vb), f"the half-width ({len(a)} and {len(b)} runs)")


@checker("the noise norm per step, divided by the clip norm, over the updated coordinates")
def check_noise_over_clip(noise_over_clip) -> None:
    """``noise_over_clip(sigma, batch_size, parameters, prune_rate=0.0, drop_rate=0.0) -> float``: the
    expected norm of the noise in one averaged DP-SGD update divided by the clip norm, σ·√d_updated / B,
    where d_updated = parameters · (1 − prune_rate) · (1 − drop_rate) coordinates receive noise."""
    from ..privacy import expected_noise_norm

    cases = [(0.5562, 256, 255_675, 0.0, 0.0), (0.5562, 256, 2_748_890, 0.0, 0.0), (0.5562, 256, 2_748_890, 0.5, 0.5),
             (3.0, 4096, 2_748_890, 0.9, 0.5), (1.2, 64, 1_000, 0.0, 0.75)]
    for sigma, batch, d, prune, drop in cases:
        updated = d * (1 - prune) * (1 - drop)
        got = noise_over_clip(sigma, batch, d, prune_rate=prune, drop_rate=drop)
        right = expected_noise_norm(sigma, 1.0, batch, updated)
        where = f"σ = {sigma}, B = {batch}, d = {d:,}, prune {prune}, drop {drop}"
        assert got is not None and np.isfinite(float(got)), f"{where}: got {got!r}, not a number"
        got = float(got)
        if math.isclose(got, sigma * updated / batch, rel_tol=1e-6):
            raise AssertionError(f"{where}: the norm of d independent N(0, σ²) coordinates grows as √d, not d")
        if math.isclose(got, expected_noise_norm(sigma, 1.0, batch, d), rel_tol=1e-6) and updated != d:
            raise AssertionError(f"{where}: only the updated coordinates receive noise; the pruned and dropped ones get none")
        if math.isclose(got, right * batch, rel_tol=1e-6):
            raise AssertionError(f"{where}: the noisy sum is divided by the expected batch size B")
        assert math.isclose(got, right, rel_tol=1e-3), f"{where}: got {got:.5g}, expected {right:.5g}"
