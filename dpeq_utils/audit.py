"""Empirical privacy audits: a lower bound on ε measured from one trained model, to set beside the
accountant's upper bound.

**The one-run audit** (Steinke, Nasr & Jagielski, NeurIPS 2023, "Privacy Auditing with One (1)
Training Run"). Take m canaries; include each in the training set independently with probability
1/2; train once; score every canary (here: minus its loss, so members should score high); guess
"member" for the ``k_plus`` highest scores and "non-member" for the ``k_minus`` lowest, abstaining on
the rest (tied scores are ordered by a random permutation, never by the canaries' order: see
:func:`guess_order`). Two conversions of "v of the r guesses were right" into an ε lower bound:

* **Steinke et al.** (``bound="steinke"``). If training is (ε, δ)-DP, each guess is right with
  probability at most e^ε / (1 + e^ε) (randomised response), and the number of correct guesses v
  among r guesses is dominated by a Binomial(r, e^ε / (1 + e^ε)) up to a δ term (their Theorem 3.1):

      P[correct ≥ v] ≤ P[Binomial(r, q_ε) ≥ v] + 2 m δ · max_{i ≥ 1} P[v − i ≤ Binomial(r, q_ε) < v] / i.

* **f-DP** (``bound="fdp"``; Mahloujifar, Melis & Chaudhuri, ICML 2025, "Auditing f-Differential
  Privacy in One Run", arXiv:2410.22235; its audit with abstention). It tests a trade-off curve f
  instead of a pair (ε, δ): if every canary's membership is f-DP, a recursion over the number of correct guesses
  shows that v correct guesses out of r occur with probability below τ, or it fails to
  (:func:`fdp_rejects`). The curve tested for a given ε is the Gaussian one, μ-GDP with the μ whose
  (ε, δ) is the one asked (Dong, Roth & Su 2022, Corollary 2.13; :func:`gaussian_mu`): the curve of
  the Gaussian mechanism, and, by their central limit theorem, nearly that of DP-SGD over many
  steps. That assumption is where its extra power comes from: ``bound="fdp_dp"`` runs the same
  recursion on the curve of (ε, δ)-DP itself, and its medians in ``benchmarks/audit_power.py`` lie
  within about 0.1 of Steinke et al.'s. So a ``"fdp"`` bound above a run's claimed ε refutes
  "μ-GDP at that ε"; a run that claims only (ε, δ)-DP is refuted by ``"steinke"`` or ``"fdp_dp"``.
  Guesses of both kinds (member, non-member) are covered: the theorem bounds guesses among the two
  values each canary's secret takes, with abstention.

:func:`epsilon_lower_bound` and :func:`fdp_epsilon_lower_bound` return the largest ε their test
rejects at the given confidence: a run whose guesses are that good cannot satisfy the hypothesis for
any smaller ε, except with probability 1 − confidence. Both are *lower* bounds: a small value never
certifies privacy (a weak attack finds little), while a value above the accountant's ε means the
implementation (or the analysis) is broken.

**Membership inference, the classic view:** the loss-threshold attack's ROC curve, its AUC and its
true-positive rate at low false-positive rates (:func:`roc_summary`).

Both conversions are written here, not copied: Steinke et al.'s from their Theorem 3.1, the f-DP
recursion from the paper's audit with abstention (the reading checked against jax-privacy's code and,
for one guess, against the curve's best accuracy by hand). ``tests/test_audit.py`` checks them against a
Gaussian mechanism with a known ε (over repeated trials they stay below it and approach it as m
grows), on scores that carry no information (a 95 % bound is positive in at most 5 % of trials,
the choice among guess sizes included), and against the values of an implementation written
elsewhere (``jax_privacy.auditing``, jax-privacy 2.0.0); ``benchmarks/audit_power.py`` prints both
bounds beside the true ε (docs/dp.md quotes it).

Why one file of ~560 lines: the statistics (both conversions, the ordering of the guesses, the
choice among guess sizes and its correction, the ceilings), the audited training run and its
records belong to one procedure and are read together; the white-box canaries' mechanics are
:mod:`dpeq_utils.gradient_canaries`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import optimize, special, stats

#: The conversions of correct guesses into an ε lower bound (``bound=`` of the audits below).
BOUNDS = {
    "steinke": "Steinke, Nasr & Jagielski (2023): (ε, δ)-DP, each guess no better than randomised response",
    "fdp": "Mahloujifar, Melis & Chaudhuri (2025) on the Gaussian trade-off curve (μ-GDP with the μ of (ε, δ))",
    "fdp_dp": "Mahloujifar, Melis & Chaudhuri (2025) on the trade-off curve of (ε, δ)-DP itself",
}


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least ``v`` of ``r`` guesses right] for an (ε, δ)-DP run with ``m`` canaries (an upper bound)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1 / (1 + math.exp(-epsilon))  # accuracy of ε-DP randomised response
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    worst = 0.0
    if v and delta:  # max over i = 1..v of P[v - i <= Binomial < v] / i
        windows = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
        worst = float(np.max(windows / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * worst)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")


def _largest_rejected(rejects, cap: float = 1e3) -> float:
    """The largest ε ≥ 0 that ``rejects`` (True below some ε, False above it) still rejects: 0 if it
    rejects none, inf if it rejects every ε up to ``cap``."""
    if not rejects(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejects(high):
        low, high = high, high * 2
        if high > cap:
            return math.inf
    for _ in range(40):  # bisection: rejects(low), not rejects(high)
        middle = (low + high) / 2
        low, high = (middle, high) if rejects(middle) else (low, middle)
    return low


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε that ``v`` correct guesses out of ``r`` (``m`` canaries) reject at ``confidence``
    (0 if none: the guesses are no better than chance allows)."""
    _check_confidence(confidence)
    level = 1 - confidence
    if r == 0:
        return 0.0
    return _largest_rejected(lambda epsilon: p_value(m, r, v, epsilon, delta) < level)


# ---------------------------------------------------------------------------------------------- the f-DP bound

def _gaussian_log_delta(mu: float, epsilon: float) -> float:
    """log δ(ε) of μ-GDP: log(Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)) (Dong, Roth & Su 2022, Corollary 2.13)."""
    first = special.log_ndtr(-epsilon / mu + mu / 2)
    second = epsilon + special.log_ndtr(-epsilon / mu - mu / 2)
    return -math.inf if second >= first else float(first + math.log1p(-math.exp(second - first)))


@functools.lru_cache(maxsize=4096)
def gaussian_mu(epsilon: float, delta: float) -> float:
    """The μ of the Gaussian trade-off curve (μ-GDP) that is (``epsilon``, ``delta``)-DP and no more:
    the Gaussian mechanism with sensitivity 1 and noise σ = 1/μ (``gaussian_epsilon(1/μ, δ)`` = ε)."""
    if not 0 < delta < 1 or epsilon < 0:
        raise ValueError(f"need epsilon >= 0 and 0 < delta < 1, got epsilon={epsilon}, delta={delta}: the f-DP bound "
                         "maps each ε to a Gaussian curve at the run's δ, so pass the δ the accountant used")
    target = math.log(delta)
    low, high = 1e-3, 1.0
    while _gaussian_log_delta(low, epsilon) > target:
        low /= 10
    while _gaussian_log_delta(high, epsilon) < target:
        low, high = high, high * 2
    return float(optimize.brentq(lambda mu: _gaussian_log_delta(mu, epsilon) - target, low, high, xtol=1e-14,
                                 rtol=1e-14))


def _blow_up_inverse(bound: str, epsilon: float, delta: float):
    """(1 − f)⁻¹ for the tested trade-off curve f (the paper's inverse "blow-up"): under f, a test
    whose true-positive rate is ``y`` has a false-positive rate of at least (1 − f)⁻¹(y)."""
    if bound == "fdp":  # μ-GDP: f(x) = Φ(Φ⁻¹(1 − x) − μ), so (1 − f)⁻¹(y) = Φ(Φ⁻¹(y) − μ)
        mu = gaussian_mu(epsilon, delta)
        return lambda y: float(special.ndtr(special.ndtri(y) - mu))
    scale = math.exp(epsilon)  # (ε, δ)-DP: f(x) = max(0, 1 − δ − e^ε x, e^−ε (1 − δ − x))
    return lambda y: max(0.0, (y - delta) / scale, 1 - delta - scale * (1 - y))


def fdp_rejects(m: int, r: int, v: int, blow_up_inverse, level: float) -> bool:
    """Whether ``v`` correct guesses out of ``r`` (``m`` canaries) have probability below ``level``
    under the trade-off curve whose blow-up inverse is given (Mahloujifar, Melis & Chaudhuri 2025,
    the audit with abstention, for two choices per canary: member or not).

    Suppose they had probability at least τ = ``level``. The recursion walks down from i = v to 0,
    keeping lower bounds on the expected fraction of right (ρ) and wrong (η) guesses per canary, from
    ρ_v = τ v / m and η_v = τ (r − v) / m: the curve forces η_i ≥ (1 − f)⁻¹(ρ_{i+1}), and ρ grows by
    i / (r − i) times η's growth. Every run makes r guesses, so ρ + η ≤ r / m; a recursion that ends
    above it contradicts the supposition, and the observation rejects the curve."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    right, wrong, most = level * v / m, level * (r - v) / m, r / m
    for i in range(v - 1, -1, -1):
        if right + wrong > most:  # both only grow from here: rejected already
            return True
        forced = max(wrong, blow_up_inverse(right))
        if forced == wrong:  # nothing moves any more
            break
        right, wrong = right + i / (r - i) * (forced - wrong), forced
    return right + wrong > most


@functools.lru_cache(maxsize=65536)  # audits of many draws meet the same (m, r, v) again and again
def fdp_epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95, bound: str = "fdp") -> float:
    """The largest ε whose trade-off curve ``v`` correct guesses out of ``r`` (``m`` canaries) reject
    at ``confidence`` (0 if none): ``bound="fdp"`` tests the Gaussian curve with the μ of (ε, δ),
    ``"fdp_dp"`` the curve of (ε, δ)-DP (:func:`fdp_rejects`)."""
    _check_confidence(confidence)
    if bound not in ("fdp", "fdp_dp"):
        raise ValueError(f"bound must be 'fdp' or 'fdp_dp' here, got {bound!r}")
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if r == 0:
        return 0.0
    level = 1 - confidence
    return _largest_rejected(lambda epsilon: fdp_rejects(m, r, v, _blow_up_inverse(bound, epsilon, delta), level))


def lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95, bound: str = "steinke") -> float:
    """The ε lower bound of ``v`` correct guesses out of ``r`` (``m`` canaries) by ``bound`` (:data:`BOUNDS`)."""
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {sorted(BOUNDS)}, got {bound!r}")
    if bound == "steinke":
        return epsilon_lower_bound(m, r, v, delta, confidence)
    return fdp_epsilon_lower_bound(m, r, v, float(delta), float(confidence), bound)


# ---------------------------------------------------------------------------------------------- guessing

@dataclass
class AuditResult:
    canaries: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    confidence: float
    delta: float
    sizes_tried: int = 1  # guess sizes the bound was selected from (their count is paid for in confidence)
    bound: str = "steinke"  # the conversion (BOUNDS)


def guess_order(scores, rng=None) -> np.ndarray:
    """The canaries' indices from the highest score to the lowest, **tied scores in a random order**
    drawn from ``rng`` (a ``numpy.random.Generator``, a seed, or None for seed 0: the same scores then
    give the same audit every time they are read).

    Why random: the guesses must depend on the scores only. Ordered by index, ties would follow the
    order the canaries were listed in; a list with the members first and constant scores would then
    "prove" ε ≈ 5 from nothing (``tests/test_audit.py``). A permutation independent of membership is
    a coin the guesser flips, which any DP bound allows."""
    scores = np.asarray(scores, dtype=float)
    if np.isnan(scores).any():
        raise ValueError(f"{int(np.isnan(scores).sum())} scores are NaN: score those canaries again, or drop them "
                         "with their inclusion flags")
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(0 if rng is None else rng)
    shuffled = generator.permutation(len(scores))
    return shuffled[np.argsort(-scores[shuffled], kind="stable")]


def _count_correct(order: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int) -> int:
    lowest = order[len(order) - k_minus:] if k_minus else order[:0]
    return int(included[order[:k_plus]].sum()) + int((~included[lowest]).sum())


def _checked(scores, included, k_plus: int = 0, k_minus: int = 0) -> tuple[np.ndarray, np.ndarray]:
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m = len(scores)
    if len(included) != m or k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"need {m} inclusion flags and k_plus + k_minus <= {m}")
    return scores, included


def one_run_audit(scores, included, k_plus: int, k_minus: int = 0, delta: float = 1e-5, confidence: float = 0.95,
                  bound: str = "steinke", rng=None) -> AuditResult:
    """Guess "member" for the ``k_plus`` highest ``scores`` and "non-member" for the ``k_minus``
    lowest (ties in a random order: :func:`guess_order`); count the correct guesses against
    ``included`` and convert them into an ε lower bound by ``bound`` (:data:`BOUNDS`)."""
    scores, included = _checked(scores, included, k_plus, k_minus)
    correct = _count_correct(guess_order(scores, rng), included, k_plus, k_minus)
    r = k_plus + k_minus
    return AuditResult(len(scores), r, correct, lower_bound(len(scores), r, correct, delta, confidence, bound),
                       confidence, delta, bound=bound)


def best_audit(scores, included, delta: float = 1e-5, confidence: float = 0.95,
               fractions=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5), bound: str = "steinke", rng=None) -> AuditResult:
    """:func:`one_run_audit` with k_plus = k_minus = fraction · m for each fraction (one order of the
    canaries for all); the largest bound, **with the selection paid for**: each of the n sizes is
    evaluated at confidence 1 − (1 − ``confidence``)/n (Bonferroni), so the chance that *any* of them
    overstates ε is at most 1 − ``confidence`` and the largest is a sound lower bound at
    ``confidence``. The same for every ``bound``.

    Keeping the best of n bounds each at the full confidence is not: on scores that carry no
    information (ε = 0), the best of six 95 % bounds is positive in ~16 % of trials, not 5 %
    (``tests/test_audit.py`` checks the corrected selection on such scores and on a Gaussian
    mechanism of known ε). The returned :class:`AuditResult` carries ``confidence`` as asked and
    ``sizes_tried`` = n.
    """
    scores, included = _checked(scores, included)
    m = len(scores)
    sizes = sorted({max(1, int(f * m)) for f in fractions if 2 * max(1, int(f * m)) <= m})
    if not sizes:
        raise ValueError(f"{m} canaries are too few for any guess size")
    each = 1 - (1 - confidence) / len(sizes)
    order = guess_order(scores, rng)
    results = []
    for k in sizes:
        correct = _count_correct(order, included, k, k)
        results.append(AuditResult(m, 2 * k, correct, lower_bound(m, 2 * k, correct, delta, each, bound), each, delta,
                                   bound=bound))
    best = max(results, key=lambda a: a.epsilon_lower_bound)
    return AuditResult(best.canaries, best.guesses, best.correct, best.epsilon_lower_bound, confidence, delta,
                       sizes_tried=len(sizes), bound=bound)


def roc_summary(member_scores, non_member_scores, fprs=(0.01, 0.001)) -> dict:
    """ROC curve of the threshold attack "member if score ≥ t", its AUC and the TPR at ``fprs``."""
    members, others = np.asarray(member_scores, float), np.asarray(non_member_scores, float)
    thresholds = np.unique(np.concatenate([members, others]))[::-1]
    tpr = np.array([0.0] + [(members >= t).mean() for t in thresholds])
    fpr = np.array([0.0] + [(others >= t).mean() for t in thresholds])
    auc = float(np.trapz(tpr, fpr))  # numpy < 2 (pyproject)
    at = {f"tpr_at_fpr_{f:g}": float(tpr[fpr <= f].max()) for f in fprs}
    return {"fpr": fpr, "tpr": tpr, "auc": auc, **at}


def gaussian_epsilon(sigma: float, delta: float, sensitivity: float = 1.0) -> float:
    """The exact ε of the Gaussian mechanism N(0, σ²) with the given sensitivity at ``delta``
    (Balle & Wang 2018, analytic Gaussian mechanism): the reference the audit is tested against."""
    def delta_of(eps: float) -> float:
        a, b = sensitivity / (2 * sigma), eps * sigma / sensitivity
        return float(stats.norm.cdf(a - b) - math.exp(eps) * stats.norm.cdf(-a - b))

    low, high = 0.0, 1.0
    while delta_of(high) > delta:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (low, middle) if delta_of(middle) <= delta else (middle, high)
    return high


# ---------------------------------------------------------------------------------------------- audited training

#: Deliberately broken DP-SGD, for the audit only (never a config field): the accountant still
#: reports the target ε, the run does not keep it.
BREAKAGES = ("noise_div_10", "no_noise")


@dataclass
class CanaryRun:
    """One audited training run: the accountant's ε (None: non-private), the audit, the attack's ROC,
    and what they were computed from (each canary's score and whether it was a member)."""

    label: str
    accountant_epsilon: float | None
    audit: AuditResult
    roc: dict
    test_accuracy: float
    scores: np.ndarray
    included: np.ndarray
    source: str | None = None  # the audit record it was read from, if any
    # the white-box audit of the same run (gradient canaries; None if the run had none)
    white_box: AuditResult | None = None
    white_scores: np.ndarray | None = None
    white_included: np.ndarray | None = None
    mechanism: dict | None = None  # what the run released through: noise_multiplier, sample_rate, steps
    # the f-DP bound (bound="fdp") of the same scores, black-box and white-box
    fdp: AuditResult | None = None
    white_box_fdp: AuditResult | None = None


def canaries_for(config, count: int, seed: int = 0):
    """``(train, test, canaries, included)``: the run's data, ``count`` canaries held out of it (the
    validation split, relabelled at random so that only a member can be fitted) and the coin flips
    (probability 1/2 each) that decide which canaries join the training set."""
    import torch

    from .data import ImageDataset, load_splits

    splits = load_splits(config.dataset, train_size=config.train_size, test_size=config.test_size,
                         validation_size=count, seed=config.seed)
    pool = splits.validation
    generator = torch.Generator().manual_seed(10_000 + seed)
    shift = torch.randint(1, len(pool.classes), (count,), generator=generator)
    canaries = ImageDataset(pool.images, (pool.labels + shift) % len(pool.classes), pool.classes, pool.mean, pool.std,
                            pool.name, {**pool.meta, "canaries": "validation split, labels shifted at random"})
    included = torch.rand(count, generator=generator) < 0.5
    return splits.train, splits.test, canaries, included


def audited_run(config, canary_count: int = 64, seed: int = 0, breakage: str | None = None, label: str = "",
                delta: float = 1e-5, confidence: float = 0.95, gradient_canaries: int = 0) -> CanaryRun:
    """Train ``config`` on its training set plus the included canaries, then audit it (one run).
    ``gradient_canaries`` > 0 also plants that many white-box gradient canaries in the same run
    (:mod:`dpeq_utils.gradient_canaries`) and audits them too."""
    return _from_record(_train_audited(config, canary_count, seed, breakage, label, gradient_canaries), delta,
                        confidence)


def _train_audited(config, canary_count: int, seed: int, breakage: str | None, label: str,
                   gradient_canaries: int = 0) -> dict:
    """Train one audited run; its audit record (what :func:`_from_record` needs, and provenance)."""
    import torch
    import torch.nn.functional as F

    from .data import ImageDataset
    from .provenance import CODE
    from .runtime import device_name, git_commit, library_versions
    from .train import evaluate, setup, train_step

    _check_breakage(breakage)
    started = time.perf_counter()
    train, test, canaries, included = canaries_for(config, canary_count, seed)
    members = ImageDataset(torch.cat([train.images, canaries.images[included]]),
                           torch.cat([train.labels, canaries.labels[included]]), train.classes, train.mean, train.std,
                           train.name, train.meta)
    state = setup(config, data=(members, test))
    white = None
    if gradient_canaries:
        from .gradient_canaries import GradientCanaries

        if config.momentum or config.modelmix or config.prune_rate or config.drop_rate:
            raise ValueError("gradient canaries read each canary's sum of updates off the final weights: they need "
                             "plain SGD (no momentum, ModelMix, pruning or dropping)")
        white = GradientCanaries(state.model, gradient_canaries, config.clip_norm, state.sample_rate,
                                 config.batch_size, config.lr, state.private, seed)
        state.variants.append(white)
    if breakage == "noise_div_10":
        state.optimizer.noise_multiplier /= 10
    elif breakage == "no_noise":  # clipping kept, noise forgotten: the classic implementation bug
        state.optimizer.noise_multiplier = 0.0
    while state.step < state.steps:
        train_step(state)
    model = state.model.eval()
    with torch.no_grad():
        losses = F.cross_entropy(model(canaries.normalized(None, state.device)),
                                 canaries.labels.to(state.device), reduction="none").cpu().numpy()
    return {
        "schema": AUDIT_SCHEMA, "key": audit_key(config, canary_count, seed, breakage, gradient_canaries),
        "label": label or config.model, "config": config.to_dict(), "canaries": canary_count, "seed": seed,
        "breakage": breakage, "accountant_epsilon": state.budget.epsilon() if state.budget else None,
        "steps": state.step, "scores": (-losses).tolist(),  # members were fitted: low loss, high score
        "included": included.tolist(), "test_accuracy": evaluate(state.model, test, state.device)[0],
        **({"gradient_canaries": {
            "count": gradient_canaries, "scores": white.scores(state.model).tolist(),
            "included": white.included.tolist(),
            "mechanism": {"noise_multiplier": float(getattr(state.optimizer, "noise_multiplier", 0.0))
                          if state.private else None, "sample_rate": state.sample_rate, "steps": state.step}}}
           if white is not None else {}),
        "wall_time_s": time.perf_counter() - started, "device": device_name(state.device),
        "machine": state.machine_history[-1]["machine"],
        "versions": library_versions(), "git_commit": git_commit(), "source_sha256": CODE["source_sha256"],
    }


def _check_breakage(breakage: str | None) -> None:
    if breakage not in (None, *BREAKAGES):
        raise ValueError(f"breakage must be one of {BREAKAGES} or None, got {breakage!r}")


def _from_record(record: dict, delta: float, confidence: float) -> CanaryRun:
    """The audits (both bounds) and the attack computed from an audit record's scores (cheap: no training)."""
    scores, included = np.asarray(record["scores"], dtype=float), np.asarray(record["included"], dtype=bool)
    white = record.get("gradient_canaries")
    white_fields = {}
    if white is not None:
        w_scores, w_included = np.asarray(white["scores"], dtype=float), np.asarray(white["included"], dtype=bool)
        white_fields = {"white_box": best_audit(w_scores, w_included, delta, confidence), "white_scores": w_scores,
                        "white_included": w_included, "mechanism": white["mechanism"],
                        "white_box_fdp": best_audit(w_scores, w_included, delta, confidence, bound="fdp")}
    return CanaryRun(record["label"], record["accountant_epsilon"], best_audit(scores, included, delta, confidence),
                     roc_summary(scores[included], scores[~included]), record["test_accuracy"], scores, included,
                     record.get("source"), fdp=best_audit(scores, included, delta, confidence, bound="fdp"),
                     **white_fields)


def separation_cap(included: np.ndarray, delta: float = 1e-5, confidence: float = 0.95, bound: str = "steinke") -> float:
    """The bound :func:`best_audit` gives when the scores separate members from non-members perfectly:
    the most these canaries, with this draw of members, can show whatever a run leaks."""
    included = np.asarray(included, dtype=bool)
    return best_audit(included.astype(float), included, delta, confidence, bound=bound).epsilon_lower_bound


def white_box_noise(run: CanaryRun) -> dict[str, float]:
    """The white-box canaries' check of the noise itself. A non-member gradient canary is never in a
    batch, so its score is the noise alone, N(0, σ²T) in units of C: divided by σ√T its standard
    deviation ``sd`` must be 1, within ``half`` (the 95 % sampling half-width of a normal sample's
    standard deviation, 1.96/√(2(n − 1))) for a correct trainer. ``z`` holds the standardised scores."""
    mechanism = run.mechanism
    z = run.white_scores[~run.white_included] / (mechanism["noise_multiplier"] * np.sqrt(mechanism["steps"]))
    half = 1.96 / np.sqrt(2 * (len(z) - 1))
    sd = float(z.std(ddof=1))
    return {"sd": sd, "half": float(half), "consistent": abs(sd - 1) <= half, "z": z}


@functools.cache  # the notebook asks for the same ceiling once per row
def audit_ceiling(count: int, delta: float = 1e-5, confidence: float = 0.95, trials: int = 20, seed: int = 0,
                  bound: str = "steinke") -> float:
    """The largest ε that :func:`best_audit` can demonstrate with ``count`` canaries: its bound on
    perfectly separating scores, median over draws of the inclusion flags. The ceiling of *this
    procedure* (k+ = k− ≤ m/2, six guess sizes, their choice paid for by Bonferroni), not of every
    audit: guessing all ``count`` canaries right at the full confidence shows more
    (:func:`all_right_bound`: 5.78 against 4.35 at m = 1,000 for ``bound="steinke"``)."""
    rng = np.random.default_rng(seed)
    return float(np.median([separation_cap(rng.random(count) < 0.5, delta, confidence, bound) for _ in range(trials)]))


def all_right_bound(count: int, delta: float = 1e-5, confidence: float = 0.95, bound: str = "steinke") -> float:
    """The bound of an audit that guesses on all ``count`` canaries, one fixed guess size, and gets
    every guess right: what ``count`` canaries can show when nothing is chosen after seeing the scores
    (no Bonferroni share) and no guess is wasted. :func:`audit_ceiling` is what :func:`best_audit`,
    with its sizes up to m/2 guesses on each side and its correction, can show."""
    return lower_bound(count, count, count, delta, confidence, bound)


def ideal_white_box_bounds(count: int, mechanism: dict, delta: float = 1e-5, confidence: float = 0.95,
                           trials: int = 20, seed: int = 0, bound: str = "steinke") -> list[float]:
    """The bounds the white-box audit reaches on ``trials`` draws of scores from the subsampled
    Gaussian mechanism itself (σ, q, T of the run; :func:`dpeq_utils.gradient_canaries.ideal_scores`):
    what perfect implementations of the same run let this audit show, draw by draw. Non-private
    (σ None) and noise-free runs separate perfectly: the ceiling."""
    from .gradient_canaries import ideal_scores

    rng = np.random.default_rng(seed)
    sigma = mechanism["noise_multiplier"] or 0.0
    return [best_audit(*ideal_scores(count, sigma, mechanism["sample_rate"], mechanism["steps"], rng), delta,
                       confidence, bound=bound).epsilon_lower_bound for _ in range(trials)]


def ideal_white_box_bound(count: int, mechanism: dict, delta: float = 1e-5, confidence: float = 0.95,
                          trials: int = 20, seed: int = 0, bound: str = "steinke") -> float:
    """The median of :func:`ideal_white_box_bounds`: where a perfect implementation of the same run
    puts this audit's bound, typically."""
    return float(np.median(ideal_white_box_bounds(count, mechanism, delta, confidence, trials, seed, bound)))


# ---------------------------------------------------------------------------------------------- audit records

#: Version of the audit record format (``data/reference/<profile>/audit/*.json``).
AUDIT_SCHEMA = 1


def audit_key(config, canary_count: int, seed: int, breakage: str | None, gradient_canaries: int = 0) -> str:
    """What decides an audited run's outcome: the run's config key, the canaries, their seed, the
    breakage, the gradient canaries (named only when there are some: older keys are unchanged)."""
    from .records import config_key

    values = {"config": config_key(config), "canaries": canary_count, "seed": seed, "breakage": breakage}
    if gradient_canaries:
        values["gradient_canaries"] = gradient_canaries
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def audit_record_path(config, canary_count: int, seed: int, breakage: str | None, runs_dir=None,
                      gradient_canaries: int = 0) -> Path:
    """``<runs dir>/audit/<model>-<breakage or "correct">-<key>.json`` (runs dir: the profile's by default)."""
    from .paths import runs_dir as default_runs_dir

    folder = Path(runs_dir) if runs_dir is not None else default_runs_dir(config.profile)
    key = audit_key(config, canary_count, seed, breakage, gradient_canaries)
    return folder / "audit" / f"{config.model}-{breakage or 'correct'}-{key}.json"


def load_or_audit(config, canary_count: int = 64, seed: int = 0, breakage: str | None = None, label: str = "",
                  runs_dir=None, force: bool = False, delta: float = 1e-5, confidence: float = 0.95,
                  write_reference: bool = False, gradient_canaries: int = 0) -> CanaryRun:
    """:func:`audited_run`, but read from its audit record when one exists: the ones shipped with the
    project (``data/reference/<profile>/audit/``) first, then the user's runs folder; otherwise (or
    with ``force``) trained and written to the user's folder. The audit itself is always recomputed
    from the stored scores. Audit records are verified as run records are: a shipped one against the
    manifest (:mod:`dpeq_utils.shipped`), any one against its ``digest``; a reference folder is
    written only with ``write_reference``."""
    from .records import find_file, read_keyed_record, record_digest, write_json_atomic
    from .shipped import guard_write, record_written

    _check_breakage(breakage)
    path = audit_record_path(config, canary_count, seed, breakage, runs_dir, gradient_canaries)
    found = None if force else find_file(Path("audit") / path.name, config.profile, runs_dir)
    if found is not None:
        record = read_keyed_record(found, AUDIT_SCHEMA, audit_key(config, canary_count, seed, breakage, gradient_canaries),
                                   "an audit record of this run", "delete it or rerun with force=True")
        return _from_record({**record, "label": label or record["label"]}, delta, confidence)
    guard_write(path.parent, write_reference)
    record = _train_audited(config, canary_count, seed, breakage, label, gradient_canaries)
    record["digest"] = record_digest(record)
    write_json_atomic(path, record)
    record_written(path)
    return _from_record({**record, "source": str(path)}, delta, confidence)


def load_or_audit_all(cases, canary_count: int = 64, seed: int = 0, gradient_canaries: int = 0,
                      train_missing: bool | None = True, runs_dir=None, **options) -> list[CanaryRun]:
    """:func:`load_or_audit` for every ``(config, breakage, label)`` of ``cases``, deciding first, for
    all of them together, whether the ones without a record may train: ``train_missing`` True trains
    them, False refuses, None trains them only if that takes at most a few minutes
    (:mod:`dpeq_utils.estimate`). A refusal raises :class:`~dpeq_utils.estimate.TrainingNotRequested`
    saying how long they would take and how to ask, before anything trains."""
    from .estimate import TrainingNotRequested, minutes_to_train, training_question
    from .records import find_file

    cases = list(cases)
    missing = [config for config, breakage, _ in cases
               if find_file(Path("audit") / audit_record_path(config, canary_count, seed, breakage, runs_dir,
                                                              gradient_canaries).name, config.profile, runs_dir) is None]
    if missing and train_missing is not True:
        what = f"the {len(missing)} audited runs that have no record"
        question = (f"[{missing[0].profile}] not training {what}. To train them, set train_missing=True."
                    if train_missing is False else
                    training_question(what, minutes_to_train(missing, missing[0].profile, runs_dir), missing[0].profile))
        if question:
            raise TrainingNotRequested(question)
    return [load_or_audit(config, canary_count, seed, breakage, label, runs_dir=runs_dir,
                          gradient_canaries=gradient_canaries, **options) for config, breakage, label in cases]
