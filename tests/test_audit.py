"""The empirical privacy audit: the one-run bound is sound on a mechanism with a known ε and tightens
with more canaries; on trained models it separates non-private from DP training and catches a
DP-SGD that forgot its noise."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from dpeq_utils.audit import (
    audit_ceiling,
    audited_run,
    best_audit,
    epsilon_lower_bound,
    gaussian_epsilon,
    ideal_white_box_bound,
    one_run_audit,
    p_value,
    roc_summary,
)
from dpeq_utils.config import RunConfig
from dpeq_utils.privacy import epsilon_spent


def test_p_value_is_the_binomial_tail_when_delta_is_zero():
    for m, r, v, eps in ((100, 40, 30, 0.5), (1000, 200, 200, 2.0), (50, 10, 0, 1.0)):
        q = math.exp(eps) / (1 + math.exp(eps))
        assert p_value(m, r, v, eps, 0.0) == pytest.approx(stats.binom.sf(v - 1, r, q), rel=1e-12)
    assert p_value(10, 10, 10, 0.0, 0.0) == pytest.approx(0.5 ** 10)
    assert p_value(1000, 200, 150, 1.0, 1e-5) > p_value(1000, 200, 150, 1.0, 0.0)  # δ only loosens


def test_the_reference_gaussian_epsilon_agrees_with_the_prv_accountant():
    for sigma in (1.0, 2.0):  # one step, q = 1: PRV is numerically tight there
        assert gaussian_epsilon(sigma, 1e-5) == pytest.approx(epsilon_spent(sigma, 1.0, 1, 1e-5, "prv"), rel=5e-3)


def test_the_bound_is_sound_and_tightens_with_more_canaries():
    """Gaussian mechanism on scalars: canary i releases 1[included] + N(0, σ²), so each canary's
    membership is protected with exactly ε(σ, δ). Over repeated trials the 95 % bound must exceed the
    true ε in at most about 5 % of them, and more canaries must give a larger bound."""
    sigma, delta = 1.0, 1e-5
    true_epsilon = gaussian_epsilon(sigma, delta)
    rng = np.random.default_rng(0)
    bounds = {}
    for m in (1000, 10_000):
        bounds[m] = []
        for _ in range(20):
            included = rng.random(m) < 0.5
            scores = included + rng.normal(0.0, sigma, m)
            bounds[m].append(best_audit(scores, included, delta, 0.95).epsilon_lower_bound)
    everything = bounds[1000] + bounds[10_000]
    assert sum(b > true_epsilon for b in everything) <= 4, (true_epsilon, everything)  # ≈ 2 expected at 5 %
    assert 0 < np.median(bounds[1000]) < np.median(bounds[10_000]) < true_epsilon


def test_choosing_the_best_guess_size_is_paid_for():
    """Scores that carry no information about membership (ε = 0): a sound 95 % lower bound is
    positive in at most 5 % of trials, with the choice among guess sizes included. Keeping the best
    of the six sizes without a correction (the same trials) overstates in far more: what this test
    exists to catch."""
    rng = np.random.default_rng(7)
    trials, m, sizes = 1000, 1000, (10, 20, 50, 100, 200, 500)
    corrected = uncorrected = 0
    for _ in range(trials):
        included, scores = rng.random(m) < 0.5, rng.normal(size=m)
        audit = best_audit(scores, included, 1e-5, 0.95)
        assert audit.sizes_tried == len(sizes) and audit.confidence == 0.95
        corrected += audit.epsilon_lower_bound > 0
        uncorrected += max(one_run_audit(scores, included, k, k).epsilon_lower_bound for k in sizes) > 0
    assert corrected / trials <= 0.05, corrected
    assert uncorrected / trials > 0.10, uncorrected  # ≈ 16 %: the selection alone breaks the guarantee


def test_random_guessing_proves_nothing_and_perfect_guessing_is_capped_by_the_canary_count():
    rng = np.random.default_rng(1)
    included = rng.random(500) < 0.5
    assert one_run_audit(rng.normal(size=500), included, 50, 50).epsilon_lower_bound < 0.5
    perfect = best_audit(included.astype(float), included)
    assert perfect.correct == perfect.guesses and 0 < perfect.epsilon_lower_bound < epsilon_lower_bound(1000, 1000, 1000, 1e-5)
    summary = roc_summary(included[included].astype(float), included[~included].astype(float))
    assert summary["auc"] == 1.0 and summary["tpr_at_fpr_0.001"] == 1.0


AUDIT = RunConfig(dataset="synthetic", train_size=128, test_size=128, model="resnet9", widths=(4, 8, 16), batch_size=64,
                  physical_batch_size=64, aug_mult=1, update_steps=100, lr=0.5, ema_decay=0.0, device="cpu",
                  target_epsilon=1.0)


@pytest.mark.slow
def test_audits_separate_private_from_non_private_training_and_catch_missing_noise():
    """64 mislabelled canaries, half of them trained on, 100 steps of a small ResNet-9."""
    private = audited_run(AUDIT, 64, gradient_canaries=1000)
    leaky = audited_run(AUDIT.replace(non_private=True, lr=0.1), 64, gradient_canaries=1000)
    broken = audited_run(AUDIT, 64, breakage="no_noise", gradient_canaries=1000)
    assert private.audit.epsilon_lower_bound <= private.accountant_epsilon <= 1.0  # consistent with its guarantee
    assert leaky.audit.epsilon_lower_bound > private.audit.epsilon_lower_bound and leaky.roc["auc"] > 0.9
    assert broken.accountant_epsilon <= 1.0 < broken.audit.epsilon_lower_bound  # caught: more leakage than ε allows
    # white-box, the same runs: within the claim for DP-SGD, and the no-noise trainer caught by a wide margin
    ceiling = audit_ceiling(1000)
    assert private.white_box.epsilon_lower_bound <= private.accountant_epsilon
    assert broken.white_box.epsilon_lower_bound == pytest.approx(ceiling) and ceiling > 4 * broken.accountant_epsilon
    assert leaky.white_box.epsilon_lower_bound == pytest.approx(ceiling)


def test_gradient_canaries_read_back_exactly_what_the_mechanism_added():
    """Without noise an included canary's score is the number of steps it was sampled in, a left-out
    canary's is 0 (real gradients never touch the reserved coordinates); with noise the scores
    spread as σ·√T around those counts."""
    from dpeq_utils.gradient_canaries import GradientCanaries
    from dpeq_utils.train import setup, train_step

    config = AUDIT.replace(update_steps=12, model="eq_resnet9", group="C4", widths=(4, 8, 8), lr=0.3)
    for breakage in ("no_noise", None):
        state = setup(config)
        if breakage:
            state.optimizer.noise_multiplier = 0.0
        canaries = GradientCanaries(state.model, 200, config.clip_norm, state.sample_rate, config.batch_size,
                                    config.lr, private=True, seed=1)
        state.variants.append(canaries)
        for _ in range(config.update_steps):
            train_step(state)
        scores, counts = canaries.scores(state.model), canaries.times_sampled.numpy()
        assert counts[~canaries.included.numpy()].sum() == 0 and counts.sum() > 0
        residual = scores - counts
        if breakage:
            assert np.abs(residual).max() < 1e-3 * config.update_steps  # float32 weights
        else:
            spread = state.optimizer.noise_multiplier * math.sqrt(config.update_steps)
            assert 0.8 < residual.std() / spread < 1.2 and abs(residual.mean()) < 4 * spread / math.sqrt(200)


def test_the_ideal_white_box_bound_stays_below_the_accountant():
    """Scores drawn from the subsampled Gaussian mechanism itself: the audit (with its selection)
    stays below the accountant's ε, and approaches it as the noise falls."""
    for sigma in (1.0, 3.0):
        mechanism = {"noise_multiplier": sigma, "sample_rate": 0.128, "steps": 200}
        accountant = epsilon_spent(sigma, 0.128, 200, 1e-5)
        assert 0 < ideal_white_box_bound(2000, mechanism) < accountant


def test_audit_records_are_written_once_and_read_back_without_training(tmp_path, monkeypatch):
    """A trained audit is stored with its scores; the next call reads it (shipped folder first) and
    recomputes the same audit; a record of another run under that name is refused."""
    from dpeq_utils import audit

    config = AUDIT.replace(update_steps=3, profile="unit")
    first = audit.load_or_audit(config, 16, runs_dir=tmp_path, label="DP")
    path = audit.audit_record_path(config, 16, 0, None, tmp_path)
    assert first.source == str(path) and path.is_file()
    record = json.loads(path.read_text())
    assert record["steps"] == 3 and len(record["scores"]) == 16 and record["accountant_epsilon"] <= 1.0

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(audit, "_train_audited", no_training)
    again = audit.load_or_audit(config, 16, runs_dir=tmp_path, label="DP")
    assert again.audit == first.audit and again.roc["auc"] == first.roc["auc"]
    assert (again.scores == first.scores).all() and (again.included == first.included).all()
    # several audits are allowed to train, or not, together and before any of them trains
    from dpeq_utils import estimate

    cases = [(config, None, "DP"), (config.replace(target_epsilon=2.0), None, "DP at 2")]
    assert audit.load_or_audit_all(cases[:1], 16, runs_dir=tmp_path, train_missing=False)[0].audit == first.audit
    with pytest.raises(estimate.TrainingNotRequested, match="not training the 1 audited runs that have no record"):
        audit.load_or_audit_all(cases, 16, runs_dir=tmp_path, train_missing=False)
    monkeypatch.setattr(estimate, "ASK_ABOVE_MINUTES", 0.0)
    with pytest.raises(estimate.TrainingNotRequested, match="set train_missing=True"):
        audit.load_or_audit_all(cases, 16, runs_dir=tmp_path, train_missing=None)

    shipped = tmp_path / "reference"
    monkeypatch.setenv("DPEQ_REFERENCE_DIR", str(shipped))
    (shipped / "unit" / "audit").mkdir(parents=True)
    from dpeq_utils.records import record_digest
    from dpeq_utils.shipped import write_manifest

    other = {**record, "test_accuracy": 0.123}
    (shipped / "unit" / "audit" / path.name).write_text(json.dumps({**other, "digest": record_digest(other)}))
    write_manifest(shipped, accept=True)  # a lab's own reference folder, vouched for by its manifest
    assert audit.load_or_audit(config, 16, runs_dir=tmp_path).test_accuracy == 0.123  # shipped first
    (shipped / "unit" / "audit" / path.name).write_text(json.dumps({**other, "digest": record_digest(other), "test_accuracy": 0.5}))
    write_manifest(shipped, accept=True)  # even in the manifest, the record's own digest catches the edit
    with pytest.raises(ValueError, match="digest mismatch"):  # edited after it was written
        audit.load_or_audit(config, 16, runs_dir=tmp_path)

    (shipped / "unit" / "audit" / path.name).write_text(json.dumps({**record, "key": "another"}))
    write_manifest(shipped, accept=True)
    with pytest.raises(ValueError, match="not an audit record of this run"):
        audit.load_or_audit(config, 16, runs_dir=tmp_path)
    with pytest.raises(ValueError, match="breakage must be one of"):
        audit.load_or_audit(config, 16, breakage="typo", runs_dir=tmp_path)
