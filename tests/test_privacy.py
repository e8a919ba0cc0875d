import math

import pytest

from dpeq_utils.privacy import PrivacyBudget, PrivacyBudgetError, calibrate_noise, epsilon_spent

RDP_CASES = [(1.0, 0.16384, 2160), (8.0, 0.16384, 2160), (8.0, 256 / 50000, 5860), (3.0, 0.01, 100), (2.0, 0.05, 300)]
PRV_CASES = [(1.0, 0.16384, 2160), (8.0, 256 / 50000, 5860), (3.0, 0.01, 100)]


@pytest.mark.parametrize("accountant,case", [("rdp", c) for c in RDP_CASES] + [("prv", c) for c in PRV_CASES])
def test_calibrated_noise_spends_at_most_and_nearly_the_target(accountant, case):
    target, q, steps = case
    sigma = calibrate_noise(target, 1e-5, q, steps, accountant)
    spent = epsilon_spent(sigma, q, steps, 1e-5, accountant)
    assert spent <= target
    assert spent >= 0.99 * target
    # a little less noise would overspend: σ is (nearly) the smallest that fits
    assert epsilon_spent(sigma * 0.99, q, steps, 1e-5, accountant) > target


def test_paper_recipe_noise_matches_facts():
    """docs/fidelity.md: Opacus RDP, q = 8192/50000, 353 epochs (2160 steps) → σ(ε=8) ≈ 4.93, σ(ε=1) ≈ 30.94."""
    q = 8192 / 50000
    assert calibrate_noise(8.0, 1e-5, q, 2160) == pytest.approx(4.93, rel=0.01)
    assert calibrate_noise(1.0, 1e-5, q, 2160) == pytest.approx(30.94, rel=0.01)


def test_rdp_agrees_with_google_dp_accounting():
    dp_accounting = pytest.importorskip("dp_accounting")
    sigma, q, steps = 0.6342, 256 / 50000, 5860
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    reference = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(1e-5)
    assert epsilon_spent(sigma, q, steps, 1e-5, "rdp") == pytest.approx(reference, rel=0.02)


@pytest.mark.parametrize("sigma,q", [(0.6342, 256 / 50000), (4.93, 0.16384), (1.3, 64 / 384), (2.0, 1.0)])
def test_rdp_epsilon_is_exactly_opacus_accountant_at_every_step_count(sigma, q):
    """dpeq computes one step's RDP once per (σ, q) and composes it itself: the ε must be the very
    float Opacus's RDPAccountant gives for the same history, at every step count, first call or not."""
    import warnings

    from opacus.accountants import RDPAccountant

    for steps in (1, 7, 2160, 5860, 1, 7):  # the second 1 and 7 come from the cached one-step RDP
        accountant = RDPAccountant()
        accountant.history = [(sigma, q, steps)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = float(accountant.get_epsilon(1e-5))
        assert epsilon_spent(sigma, q, steps, 1e-5, "rdp") == expected


def test_prv_is_tighter_than_rdp():
    sigma, q, steps = 0.6342, 256 / 50000, 5860
    rdp, prv = epsilon_spent(sigma, q, steps, 1e-5, "rdp"), epsilon_spent(sigma, q, steps, 1e-5, "prv")
    assert prv < rdp
    assert rdp == pytest.approx(7.99, abs=0.02) and prv == pytest.approx(7.03, abs=0.1)  # docs/fidelity.md


@pytest.mark.parametrize("kwargs,message", [
    (dict(target_epsilon=0.0), "target_epsilon must be > 0"),
    (dict(target_epsilon=-1.0), "target_epsilon must be > 0"),
    (dict(target_epsilon=math.nan), "target_epsilon must be a finite number"),
    (dict(target_epsilon=math.inf), "target_epsilon must be a finite number"),
    (dict(sample_rate=0.0), "sample_rate must be > 0"),
    (dict(sample_rate=1.5), "sample_rate must be <= 1"),
    (dict(sample_rate=math.nan), "sample_rate must be a finite number"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(steps=2.5), "steps must be an integer >= 1"),
    (dict(target_delta=0.0), "target_delta must be > 0"),
    (dict(target_delta=1e-3, dataset_size=1000), "not below 1/N"),
    (dict(target_delta=2e-3, dataset_size=1000), "not below 1/N"),
    (dict(accountant="gdp"), "unknown accountant"),
])
def test_bad_inputs_get_clear_errors(kwargs, message):
    args = dict(target_epsilon=8.0, target_delta=1e-5, sample_rate=0.01, steps=100, accountant="rdp")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        calibrate_noise(**args)


def test_epsilon_spent_rejects_bad_sigma():
    with pytest.raises(ValueError, match="noise_multiplier"):
        epsilon_spent(0.0, 0.01, 10, 1e-5)
    with pytest.raises(ValueError, match="noise_multiplier"):
        epsilon_spent(math.inf, 0.01, 10, 1e-5)


def test_budget_refuses_a_step_beyond_the_allowance():
    budget = PrivacyBudget(2.0, 1e-5, 0.05, 20, dataset_size=1000)
    for _ in range(20):
        budget.spend()
    assert budget.epsilon() <= 2.0
    with pytest.raises(PrivacyBudgetError, match="would exceed"):
        budget.spend()


def test_budget_refuses_a_noise_level_that_overspends():
    with pytest.raises(PrivacyBudgetError, match="> target"):
        PrivacyBudget(1.0, 1e-5, 0.05, 200, noise_multiplier=0.8)


def test_unreachable_budget_is_reported():
    """Below the RDP accountant's floor no σ helps, and the message says so (not "lower q/T")."""
    with pytest.raises(PrivacyBudgetError, match="cannot certify ε=1e-06 .* whatever the noise"):
        calibrate_noise(1e-6, 1e-5, 1.0, 10_000)


def test_rdp_by_hand_is_the_accountants_sum_and_its_epsilon():
    """Notebook 03's accounting by hand: the binomial sum at integer orders and the integral at
    fractional ones equal Opacus's RDP there, the conversion equals Opacus's at the same orders, and at
    the accountant's own orders the ε by hand is the trainer's ε to 1e-6 (what 03 prints and asserts)."""
    import warnings

    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as opacus_rdp

    from dpeq_utils.privacy import epsilon_by_hand, epsilon_spent, rdp_of_one_step_by_hand

    for sigma, q in ((0.7, 0.02), (3.0, 8192 / 50_000), (1.1, 0.0256), (0.4, 0.5)):  # budgets from ε ≈ 0.3 to 16+
        orders = [2, 3, 8, 32, 128, 1.1, 1.5, 2.5, 7.3, 10.9]
        ours = np.array([rdp_of_one_step_by_hand(sigma, q, a) for a in orders])
        theirs = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
        assert np.allclose(ours[:5], theirs[:5], rtol=1e-9)  # integer orders: the same sum
        assert np.allclose(ours[5:], theirs[5:], rtol=1e-7)  # fractional: an integral against Opacus's series
        integer_orders = list(range(2, 257))
        one_step = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=integer_orders)
        for steps in (40, 2160):
            by_hand, order = epsilon_by_hand(sigma, q, steps, 1e-5, orders=integer_orders)
            with warnings.catch_warnings():  # the best order at the grid's edge: Opacus warns, the value stands
                warnings.simplefilter("ignore")
                at_integers, best = opacus_rdp.get_privacy_spent(orders=integer_orders, rdp=one_step * steps, delta=1e-5)
            assert math.isclose(by_hand, at_integers, rel_tol=1e-9) and order == best
            accountant_orders, order = epsilon_by_hand(sigma, q, steps, 1e-5)
            assert order in RDPAccountant.DEFAULT_ALPHAS
            assert math.isclose(epsilon_spent(sigma, q, steps, 1e-5, "rdp"), accountant_orders, rel_tol=1e-6)
