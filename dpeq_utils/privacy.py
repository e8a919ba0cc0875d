"""Noise calibration and privacy accounting for DP-SGD with Poisson sampling.

Both functions take the sample rate ``q`` and the number of steps ``T`` that the sampler will
*really* use; the trainer derives them from the same numbers it samples with. (Opacus's
``make_private_with_epsilon`` calibrates with ``q = 1/len(data_loader)``, which is not the rate its
Poisson sampler uses when the dataset size is not a multiple of the batch size; the official code
of the paper calibrated with a different q and T than its loader used, overshooting ε by ~1%.)

Accountants (Opacus implementations):

``"rdp"``
    Rényi DP (Mironov 2017; Mironov et al. 2019), the paper's accountant; an upper bound on ε.
``"prv"``
    Privacy random variables (Gopi et al. 2021), numerically tight; dpeq reports its *upper*
    estimate, so ε is never understated. For the same σ it gives a smaller ε than RDP.

Calibration finds the smallest σ (to 0.1% relative) whose ε does not exceed the target, so
``epsilon_spent(calibrate_noise(...)) <= target_epsilon`` always holds.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from .errors import DpeqError


class PrivacyBudgetError(DpeqError, RuntimeError):
    """A run would spend more privacy than its target allows."""


def _check_finite(name: str, value, low=None, high=None, low_open=True, high_open=True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return float(value)


def _check_common(sample_rate, steps, target_delta, dataset_size, accountant) -> None:
    _check_finite("sample_rate", sample_rate, 0, 1, low_open=True, high_open=False)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    _check_finite("target_delta", target_delta, 0, 1)
    if dataset_size is not None:
        if not isinstance(dataset_size, int) or dataset_size < 1:
            raise ValueError(f"dataset_size must be a positive integer, got {dataset_size!r}")
        if target_delta >= 1 / dataset_size:
            raise ValueError(f"target_delta={target_delta} is not below 1/N = 1/{dataset_size}: such a δ allows "
                             f"releasing a whole example. Use δ < {1 / dataset_size:.2e} (the paper uses 1e-5 for N=50000).")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}")


@functools.lru_cache(maxsize=4096)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Rényi DP of one sampled Gaussian step at each of Opacus's orders (read-only).

    The expensive part of RDP accounting (Opacus sums a series per fractional order in Python:
    0.15–0.3 s per σ at the smoke profile's σ ≈ 0.67 on a 2-core EPYC), and the same for every
    step count, so it is computed once per (σ, q) in a process: a run's ε at each evaluation, the
    check of a calibrated σ and repeated calibrations of the same budget reuse it.
    """
    rdp = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                   orders=RDPAccountant.DEFAULT_ALPHAS)
    rdp.flags.writeable = False
    return rdp


def _rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, target_delta: float) -> float:
    # exactly what RDPAccountant.get_epsilon computes for one (σ, q, T) entry: Opacus composes T
    # steps as (RDP of one step) × T and converts at its default orders (tested bit-equal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about the optimal RDP order at the grid's edge
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS,
                                                rdp=_rdp_of_one_step(noise_multiplier, sample_rate) * steps,
                                                delta=target_delta)
        return float(eps)


def _prv_epsilon(noise_multiplier: float, sample_rate: float, steps: int, target_delta: float) -> float:
    # PRV ε never exceeds RDP ε; its discretisation error is absolute, so tie it to that scale
    # (0.1%), which keeps small budgets resolved and large ones cheap
    eps_rdp = _rdp_epsilon(noise_multiplier, sample_rate, steps, target_delta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prv = PRVAccountant()
        prv.history = [(noise_multiplier, sample_rate, steps)]
        return float(prv.get_epsilon(target_delta, eps_error=max(1e-3 * eps_rdp, 1e-4)))


@dataclass(frozen=True)
class Accountant:
    """An accountant: ``epsilon(σ, q, T, δ)``, and whether its ε never exceeds RDP's for the same σ
    (then calibration starts from RDP's σ and walks down, and RDP's floor does not bind it)."""

    epsilon: Callable[[float, float, int, float], float]
    below_rdp: bool


#: Accountants by name; add one here (and a test against an independent implementation).
ACCOUNTANT_REGISTRY = {"rdp": Accountant(_rdp_epsilon, below_rdp=False), "prv": Accountant(_prv_epsilon, below_rdp=True)}
ACCOUNTANTS = tuple(ACCOUNTANT_REGISTRY)


def _epsilon(noise_multiplier: float, sample_rate: float, steps: int, target_delta: float, accountant: str) -> float:
    return ACCOUNTANT_REGISTRY[accountant].epsilon(noise_multiplier, sample_rate, steps, target_delta)


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, target_delta: float,
                  accountant: str = "rdp", dataset_size: int | None = None) -> float:
    """ε of ``steps`` Poisson-sampled Gaussian-mechanism steps at rate ``sample_rate`` and noise σ.

    >>> round(epsilon_spent(0.6342, 256 / 50000, 5860, 1e-5), 2)
    7.99
    """
    _check_common(sample_rate, steps, target_delta, dataset_size, accountant)
    _check_finite("noise_multiplier", noise_multiplier, 0)
    return _epsilon(float(noise_multiplier), float(sample_rate), steps, float(target_delta), accountant)


def calibrate_noise(target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp", dataset_size: int | None = None, rtol: float = 1e-3) -> float:
    """The smallest noise multiplier σ (within ``rtol``) with ``epsilon_spent(σ, ...) <= target_epsilon``.

    >>> sigma = calibrate_noise(8.0, 1e-5, 256 / 50000, 5860)
    >>> round(sigma, 2), epsilon_spent(sigma, 256 / 50000, 5860, 1e-5) <= 8.0
    (0.63, True)
    """
    _check_common(sample_rate, steps, target_delta, dataset_size, accountant)
    target_epsilon = _check_finite("target_epsilon", target_epsilon, 0)
    _check_finite("rtol", rtol, 0, 0.1)

    def bisect(eps, low: float, high: float) -> float:
        """Smallest σ in [low, high] with eps(σ) <= target, given eps(low) > target >= eps(high)."""
        while (high - low) / high > rtol:
            middle = (low + high) / 2
            low, high = (low, middle) if eps(middle) <= target_epsilon else (middle, high)
        return high

    def eps(sigma: float) -> float:
        return _epsilon(sigma, sample_rate, steps, target_delta, accountant)

    def rdp(sigma: float) -> float:
        return _rdp_epsilon(sigma, sample_rate, steps, target_delta)

    def smallest_sufficient(eps) -> float:
        high = 1.0
        while eps(high) > target_epsilon:  # grow until the budget holds
            high *= 2
            if high > 1e5:
                raise PrivacyBudgetError(f"no noise multiplier up to 1e5 reaches ε={target_epsilon} with q={sample_rate}, "
                                         f"T={steps}, δ={target_delta}: raise ε, or lower q or T")
        low = high / 2
        while low > 1e-3 and eps(low) <= target_epsilon:  # shrink until it is violated
            low, high = low / 2, low
        return bisect(eps, low, high)

    below_rdp = ACCOUNTANT_REGISTRY[accountant].below_rdp
    floor = rdp_epsilon_floor(target_delta)
    if target_epsilon <= floor:
        if not below_rdp:
            raise PrivacyBudgetError(
                f"the {accountant.upper()} accountant cannot certify ε={target_epsilon} at δ={target_delta}: converting "
                f"Rényi DP to (ε, δ) adds at least {floor:.3f} whatever the noise, so no σ, q or T reaches it. Use "
                "accountant='prv' (numerically tight; it reaches far smaller ε), or raise ε.")
        return smallest_sufficient(eps)  # RDP gives no starting point here
    if not below_rdp:
        return smallest_sufficient(eps)

    # this accountant's ε is below RDP's for the same σ, so its σ is below the RDP one. Walk down in
    # small steps rather than probing tiny σ: PRV's cost and memory explode for ε far above the target.
    high = smallest_sufficient(rdp)
    low = high * 0.9
    while eps(low) <= target_epsilon:
        low, high = low * 0.9, low
    return bisect(eps, low, high)


def rdp_epsilon_floor(target_delta: float) -> float:
    """The smallest ε the RDP accountant can certify at ``target_delta``, whatever σ, q and T: the
    conversion from Rényi DP adds ``log((α-1)/α) - (log δ + log α)/(α-1)`` at the best order α of
    Opacus's grid even when the Rényi divergence itself is 0.

    >>> round(rdp_epsilon_floor(1e-5), 3)
    0.103
    """
    return min(math.log((a - 1) / a) - (math.log(target_delta) + math.log(a)) / (a - 1)
               for a in RDPAccountant.DEFAULT_ALPHAS)


class PrivacyBudget:
    """The trainer's guard: σ, q and the step allowance that keep ε at or below the target.

    ε grows with every step, so the budget is a number of steps. :meth:`spend` counts one step and
    refuses a step beyond the allowance; the ε reported for a run is computed from the steps really
    taken.
    """

    def __init__(self, target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
                 accountant: str = "rdp", dataset_size: int | None = None, noise_multiplier: float | None = None):
        self.target_epsilon, self.target_delta = float(target_epsilon), float(target_delta)
        self.sample_rate, self.allowed_steps, self.accountant = float(sample_rate), int(steps), accountant
        if noise_multiplier is None:
            noise_multiplier = calibrate_noise(target_epsilon, target_delta, sample_rate, steps, accountant, dataset_size)
        self.noise_multiplier = float(noise_multiplier)
        planned = epsilon_spent(self.noise_multiplier, sample_rate, steps, target_delta, accountant, dataset_size)
        if planned > self.target_epsilon:
            raise PrivacyBudgetError(f"σ={self.noise_multiplier:.4g} over {steps} steps at q={sample_rate:.4g} spends "
                                     f"ε={planned:.4f} > target {self.target_epsilon}: use more noise or fewer steps")
        self.steps_taken = 0

    def spend(self) -> None:
        if self.steps_taken >= self.allowed_steps:
            raise PrivacyBudgetError(f"step {self.steps_taken + 1} would exceed the {self.allowed_steps} steps that "
                                     f"ε={self.target_epsilon} allows at σ={self.noise_multiplier:.4g}")
        self.steps_taken += 1

    def epsilon(self) -> float:
        """ε spent by the steps taken so far (0 before the first)."""
        if self.steps_taken == 0:
            return 0.0
        return epsilon_spent(self.noise_multiplier, self.sample_rate, self.steps_taken, self.target_delta, self.accountant)


def expected_noise_norm(noise_multiplier: float, clip_norm: float, batch_size: float, num_params: int) -> float:
    """Expected norm of the noise in one averaged DP-SGD gradient: ``σ C sqrt(d) / B`` (for large d).

    The clipped signal's norm is at most ``C`` whatever ``d`` is, so the noise-to-signal ratio grows
    as ``sqrt(d)``: the reason DP-SGD favours models with fewer parameters.

    >>> round(expected_noise_norm(1.0, 1.0, 100, 10_000), 3)
    1.0
    """
    return noise_multiplier * clip_norm * math.sqrt(num_params) / batch_size


# ------------------------------------------------------------------------------ accounting by hand


def rdp_of_one_step_by_hand(noise_multiplier: float, sample_rate: float, order: float) -> float:
    """Rényi DP at order α > 1 of one step of the sampled Gaussian mechanism (Poisson rate q, noise σ),
    from its definition (Mironov, Talwar, Zhang 2019): ε(α) = log(A_α) / (α − 1) with

        A_α = E_{z ~ N(0, σ²)} [ ((1 − q) + q · exp((2z − 1) / (2σ²)))^α ],

    the α-th moment of the likelihood ratio between "the example was sampled" and "it was not".
    At an integer α the binomial theorem turns the expectation into a finite sum,

        A_α = Σ_{k=0..α} C(α, k) (1 − q)^(α−k) q^k exp((k² − k) / (2σ²)),

    summed here in log space (the terms grow fast); at a fractional α the expectation is integrated
    numerically (scipy's adaptive quadrature, split where its mass lies: around 0 and around z = α).
    Written for notebook 03, to be set beside the accountant (:func:`epsilon_spent` uses Opacus, whose
    series for fractional orders is a different route to the same number: they agree to ~1e-8)."""
    order = float(order)
    if not order > 1:
        raise ValueError(f"Rényi DP is defined here for orders α > 1, got {order!r}")
    q, sigma = float(sample_rate), float(noise_multiplier)
    if order.is_integer():
        alpha = int(order)
        k = np.arange(alpha + 1)
        log_binomial = (math.lgamma(alpha + 1) - np.array([math.lgamma(i + 1) + math.lgamma(alpha - i + 1) for i in k]))
        with np.errstate(divide="ignore"):  # q = 0 or 1: a log of 0 is -inf, which the sum handles
            log_terms = (log_binomial + (alpha - k) * np.log1p(-q) + k * np.log(q) + (k * k - k) / (2 * sigma ** 2))
        top = log_terms.max()
        return float((top + np.log(np.exp(log_terms - top).sum())) / (alpha - 1))
    if q == 0:
        return 0.0
    from scipy import integrate

    def log_integrand(z: float) -> float:
        mixture = np.logaddexp(math.log1p(-q) if q < 1 else -math.inf, math.log(q) + (2 * z - 1) / (2 * sigma ** 2))
        return -z * z / (2 * sigma ** 2) + order * mixture - math.log(sigma * math.sqrt(2 * math.pi))

    shift = max(log_integrand(0.0), log_integrand(order))  # keeps exp() finite whatever σ and α
    edges = [-math.inf, -10 * sigma, 0.0, order, order + 10 * sigma, math.inf]
    scaled = sum(integrate.quad(lambda z: math.exp(log_integrand(z) - shift), low, high, epsabs=0, epsrel=1e-13,
                                limit=200)[0] for low, high in zip(edges, edges[1:]))
    return float((shift + math.log(scaled)) / (order - 1))


def epsilon_by_hand(noise_multiplier: float, sample_rate: float, steps: int, target_delta: float,
                    orders=None) -> tuple[float, float]:
    """(ε, the order that gives it) for ``steps`` composed steps: RDP adds up over steps (T·ε(α)), then
    each order converts to (ε, δ) as Opacus does (Balle et al. 2020's conversion,
    ``ε = T·ε(α) − (log δ + log α)/(α − 1) + log((α − 1)/α)``) and the smallest ε wins. ``orders``
    defaults to the accountant's own (Opacus's: 1.1–10.9 in steps of 0.1, then 12–63), so the result is
    the ε the trainer's RDP accountant reports, computed by another route (tested to 1e-6)."""
    orders = RDPAccountant.DEFAULT_ALPHAS if orders is None else orders
    best = (math.inf, 0)
    for order in orders:
        eps = (steps * rdp_of_one_step_by_hand(noise_multiplier, sample_rate, order)
               - (math.log(target_delta) + math.log(order)) / (order - 1) + math.log((order - 1) / order))
        best = min(best, (eps, order))
    return best
