"""DP-SGD variants (pre-pruning + gradient dropping, ModelMix) and the De et al. recipe as trainer options."""

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL, dp_optimizer, parameters_of, random_batch, relative_error, small_model

from dpeq_utils.config import RunConfig, baseline_entries, config_from_profile
from dpeq_utils.data import make_synthetic
from dpeq_utils.dp_step import logical_step
from dpeq_utils.models import build_model
from dpeq_utils.per_sample import naive_per_sample_grads
from dpeq_utils.privacy import calibrate_noise, epsilon_spent
from dpeq_utils.records import REQUIRED_FIELDS
from dpeq_utils.runs import load_or_run
from dpeq_utils.train import fit
from dpeq_utils.variants import CoordinateSelector, ModelMix, kept_count

TINY = dict(train_size=96, test_size=32, batch_size=32, physical_batch_size=32, update_steps=3, eval_every=0,
            aug_mult=1)


# ---------------------------------------------------------------------------------------------- pruning, dropping


def test_magnitude_pruning_keeps_the_largest_initial_weights_and_zeroes_the_rest():
    model = small_model("resnet9")
    initial = parameters_of(model)
    selector = CoordinateSelector(model, prune_rate=0.3, prune_method="magnitude", generator=torch.Generator().manual_seed(0))
    for name, p in model.named_parameters():
        mask = selector.prune_masks[name]
        assert int(mask.sum()) == kept_count(p.numel(), 0.3)
        assert torch.equal(p[~mask], torch.zeros_like(p[~mask]))
        if (~mask).any():
            assert initial[name][mask].abs().min() >= initial[name][~mask].abs().max()
    assert selector.kept_fraction == pytest.approx(0.7, abs=0.01)


def test_one_step_touches_only_kept_coordinates_and_noise_lands_only_there():
    model = small_model("resnet9")
    selector = CoordinateSelector(model, prune_rate=0.5, prune_method="random", drop_rate=0.5, drop_method="magnitude",
                                  generator=torch.Generator().manual_seed(0))
    mask = selector.select(model)
    before = parameters_of(model)
    optimizer = dp_optimizer(model, sigma=5.0, clip=1.0, expected_batch=6, lr=0.5, seed=3)
    logical_step(model, optimizer, [random_batch()], 1, private=True, batch_size=6, variants=[selector])
    for name, p in model.named_parameters():
        changed = p.detach() != before[name]
        assert torch.equal(changed, mask[name]), name  # every kept coordinate moved (noise), no other did
    assert 0.2 < selector.updated_fractions[-1] < 0.3  # half pruned, then half of the rest dropped


def test_gradients_are_restricted_before_clipping():
    """σ = 0: the update is lr/B · Σ clip(g_i ⊙ m) — the clipping norm counts kept coordinates only."""
    model = small_model("resnet9").double()
    selector = CoordinateSelector(model, drop_rate=0.7, drop_method="random", generator=torch.Generator().manual_seed(1))
    mask = selector.select(model)
    views, labels = random_batch()
    views = views.double()
    per_example = naive_per_sample_grads(model, views, labels)
    clip, lr = 1e-3, 0.5
    flat = torch.cat([(per_example[n] * mask[n]).flatten(1) for n in per_example], 1)
    factors = (clip / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
    assert (factors < 0.5).all(), "the check needs gradients that really get clipped"
    expected = {n: -lr / 6 * torch.einsum("b,b...->...", factors, per_example[n] * mask[n]) for n in per_example}
    before = parameters_of(model)
    optimizer = dp_optimizer(model, sigma=0.0, clip=clip, expected_batch=6, lr=lr, seed=3)
    logical_step(model, optimizer, [(views, labels)], 1, private=True, batch_size=6, variants=[selector])
    moved = torch.cat([(p.detach() - before[n]).flatten() for n, p in model.named_parameters()])
    assert relative_error(moved, torch.cat([expected[n].flatten() for n in per_example])) < 1e-6


def _masks_of_a_run(monkeypatch, data, drop_method):
    masks = []
    original = CoordinateSelector.select

    def recording(self, model):
        result = original(self, model)
        masks.append({n: m.clone() for n, m in result.items()})
        return result

    monkeypatch.setattr(CoordinateSelector, "select", recording)
    config = RunConfig(model="resnet9", widths=SMALL, prune_rate=0.5, prune_method="magnitude", drop_rate=0.5,
                       drop_method=drop_method, **{**TINY, "train_size": None, "test_size": None})
    fit(config, progress=False, data=data)
    monkeypatch.setattr(CoordinateSelector, "select", original)
    return masks


@pytest.mark.parametrize("drop_method", ["random", "magnitude"])
def test_selection_never_reads_private_data(monkeypatch, drop_method):
    """Two runs with the same seed on *different* training data: the pruning mask and the first step's
    selection are identical (they see only the seed and the initial weights); random dropping stays
    identical at every step; magnitude dropping may differ later only because the DP iterates differ."""
    first = make_synthetic(96, 32, seed=0)
    other_train, _ = make_synthetic(96, 32, seed=1)
    second = (other_train, first[1])
    masks_a = _masks_of_a_run(monkeypatch, first, drop_method)
    masks_b = _masks_of_a_run(monkeypatch, second, drop_method)
    assert len(masks_a) == len(masks_b) == 3
    steps_equal = [all(torch.equal(a[n], b[n]) for n in a) for a, b in zip(masks_a, masks_b)]
    assert steps_equal[0]
    if drop_method == "random":
        assert all(steps_equal)


# ---------------------------------------------------------------------------------------------- ModelMix


def test_modelmix_mix_matches_its_closed_form():
    """ModelMix.mix against what it must compute, written independently of its code: with α the
    generator's uniform draw, coordinates at least τ apart are mixed as they are, α·θ + (1-α)·θ';
    closer ones are first pushed symmetrically to exactly τ apart, so the result is their midpoint
    plus (α - ½)·τ in the direction of θ - θ' (+ where equal)."""
    lr, gap_rate = 0.5, 0.2
    tau = lr * gap_rate
    mixer = ModelMix(small_model("resnet9"), gap_rate=gap_rate, lr=lr, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    current = torch.randn(10_000, generator=generator) * 0.1
    previous = current + torch.randn(10_000, generator=generator) * 0.1
    previous[:100] = current[:100]
    mixed = mixer.mix(current, previous)
    alpha = torch.rand(10_000, generator=torch.Generator().manual_seed(0))  # the draw mix() makes
    far = (current - previous).abs() >= tau
    assert 0.3 < float(far.float().mean()) < 0.7, "the check needs both kinds of coordinates"
    torch.testing.assert_close(mixed[far], (alpha * current + (1 - alpha) * previous)[far])
    sign = torch.where(current >= previous, 1.0, -1.0)
    near = (current + previous) / 2 + (alpha - 0.5) * tau * sign
    torch.testing.assert_close(mixed[~far], near[~far])
    assert 0.45 < float(alpha.mean()) < 0.55


def test_modelmix_steps_from_the_mix_and_remembers_the_current_iterate():
    model = small_model("resnet9")
    mixer = ModelMix(model, gap_rate=0.15, lr=0.5, generator=torch.Generator().manual_seed(0))
    start = parameters_of(model)
    optimizer = dp_optimizer(model, sigma=0.0, clip=1e6, expected_batch=6, lr=0.5, seed=3)
    logical_step(model, optimizer, [random_batch()], 1, private=True, batch_size=6, variants=[mixer])
    assert all(torch.equal(mixer.previous[n], start[n]) for n in start)
    first = parameters_of(model)
    # the first mix is between θ0 and θ0 pushed apart by τ: every coordinate moved by at most τ/2 + lr·|g|
    assert any(not torch.equal(first[n], start[n]) for n in start)
    reference = small_model("resnet9")
    views, labels = random_batch()
    F.cross_entropy(reference(views.flatten(0, 1)), labels.repeat_interleave(views.shape[1])).backward()
    for n, p in reference.named_parameters():
        bound = mixer.tau / 2 + 0.5 * p.grad.abs() + 1e-6
        assert ((first[n] - start[n]).abs() <= bound).all(), n
    logical_step(model, optimizer, [random_batch(seed=1)], 1, private=True, batch_size=6, variants=[mixer])
    assert all(torch.equal(mixer.previous[n], first[n]) for n in first)


# ---------------------------------------------------------------------------------------------- De et al.


def test_wrn16_4_has_no_batch_statistics():
    """An example's output does not depend on the rest of the batch (train mode, where BatchNorm would)."""
    model = build_model("wrn16_4").train()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        together = model(images)
        alone = torch.cat([model(images[i:i + 1]) for i in range(4)])
    assert relative_error(together, alone) < 1e-5
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name,published_sigma", [("de_et_al_eps1", 10.0), ("de_et_al_eps8", 3.0)])
def test_de_et_al_published_settings(name, published_sigma):
    """The paper profile's entries carry their published settings; their σ spends at most their ε under
    dpeq's accountant, so dpeq's calibrated σ is at most theirs (equal ε, less noise or the same)."""
    config = config_from_profile("paper", name)
    assert (config.model, config.batch_size, config.aug_mult, config.clip_norm, config.momentum) == ("wrn16_4", 4096, 16, 1.0, 0.0)
    q = config.batch_size / 50_000
    assert epsilon_spent(published_sigma, q, config.update_steps, config.target_delta) <= config.target_epsilon
    sigma = calibrate_noise(config.target_epsilon, config.target_delta, q, config.update_steps)
    assert 0.85 * published_sigma <= sigma <= published_sigma


# ---------------------------------------------------------------------------------------------- whole runs


@pytest.mark.parametrize("baseline", ["de_et_al", "pruning_dropping", "modelmix"])
def test_each_baseline_runs_and_writes_a_valid_record(tmp_path, baseline):
    config = config_from_profile("smoke", baseline, **TINY)
    record = load_or_run(config, runs_dir=tmp_path, progress=False)
    assert all(field in record for field in REQUIRED_FIELDS)
    assert record["config"]["model"] == "wrn16_4"
    assert record["epsilon_spent"] <= config.target_epsilon
    if baseline == "pruning_dropping":
        assert record["kept_params"] == pytest.approx(record["num_params"] / 2, rel=0.01)
        assert 0.2 < record["mean_updated_fraction"] < 0.3
        assert record["config"]["prune_rate"] == 0.5
    else:
        assert record["kept_params"] == record["num_params"] and record["mean_updated_fraction"] == 1.0
    if baseline == "modelmix":
        assert record["config"]["modelmix"] is True


def test_every_profile_names_the_three_baselines():
    for profile in ("smoke", "teach", "paper"):
        entries = baseline_entries(profile)
        assert {"de_et_al", "pruning_dropping", "modelmix"} <= set(entries), profile
        for name in entries:
            config_from_profile(profile, name)  # valid configs


def test_bad_variant_settings_get_clear_errors():
    with pytest.raises(ValueError, match=r"prune_rate must lie in \[0, 1\)"):
        RunConfig(prune_rate=1.0)
    with pytest.raises(ValueError, match="drop_method must be one of"):
        RunConfig(drop_rate=0.5, drop_method="gradient")
    with pytest.raises(ValueError, match="modelmix cannot be combined"):
        RunConfig(modelmix=True, drop_rate=0.5)
    with pytest.raises(ValueError, match=r"has no baseline\(s\) \['dee'\].*de_et_al"):
        config_from_profile("smoke", "dee")
