import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import dp_optimizer, random_batch, relative_error, small_model

from dpeq_utils.config import RunConfig, config_from_profile, parse_assignment
from dpeq_utils.data import augment_views, make_synthetic
from dpeq_utils.dp_step import _store_per_sample_gradients, logical_step
from dpeq_utils.per_sample import vmap_per_sample_grads  # the reference engine
from dpeq_utils.records import REQUIRED_FIELDS, config_key, record_path, results_table
from dpeq_utils.run_state import WeightEMA, swapped_parameters
from dpeq_utils.runs import load_or_run, run
from dpeq_utils.train import evaluate

REPO = Path(__file__).resolve().parents[1]


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ---------------------------------------------------------------------------------------------- one step


def test_dp_step_without_noise_or_clipping_is_plain_sgd_on_the_mean_gradient():
    views, labels = random_batch()
    dp_model, ref_model = small_model(), small_model()
    optimizer = dp_optimizer(dp_model, sigma=0.0, clip=1e6, expected_batch=6, lr=0.1)
    chunks = [(views[:4], labels[:4]), (views[4:], labels[4:])]  # two physical chunks, one logical step
    logical_step(dp_model, optimizer, chunks, num_chunks=2, private=True, batch_size=6)

    ref_optimizer = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    logits = ref_model(views.flatten(0, 1))
    F.cross_entropy(logits, labels.repeat_interleave(2)).backward()  # mean over examples and views
    ref_optimizer.step()
    before = _flat(small_model())
    assert relative_error(_flat(dp_model) - before, _flat(ref_model) - before) < 1e-4


def test_non_private_step_equals_the_same_plain_sgd():
    views, labels = random_batch()
    model, ref_model = small_model(), small_model()
    logical_step(model, torch.optim.SGD(model.parameters(), lr=0.1), [(views[:4], labels[:4]), (views[4:], labels[4:])],
                 num_chunks=2, private=False, batch_size=6)
    F.cross_entropy(ref_model(views.flatten(0, 1)), labels.repeat_interleave(2)).backward()
    torch.optim.SGD(ref_model.parameters(), lr=0.1).step()
    before = _flat(small_model())
    assert relative_error(_flat(model) - before, _flat(ref_model) - before) < 1e-4


def test_every_clipped_per_example_gradient_has_norm_at_most_clip_norm():
    clip = 1e-3
    views, labels = random_batch(batch=5)
    model = small_model()
    grads, _ = vmap_per_sample_grads(model, views, labels)
    norms = torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1)
    assert (norms > 10 * clip).all(), "the check needs gradients that really get clipped"

    optimizer = dp_optimizer(model, sigma=0.0, clip=clip, expected_batch=5)
    params = list(model.parameters())
    previous = [torch.zeros_like(p) for p in params]
    chunks = [(views[i:i + 1], labels[i:i + 1]) for i in range(5)]  # one example per chunk
    total = torch.zeros(())
    for i, chunk in enumerate(chunks):
        # the trainer's code path, one chunk at a time, looking at what each example adds
        _store_per_sample_gradients(model, *chunk)
        optimizer.signal_skip_step(do_skip=i < 4)
        if i < 4:
            optimizer.step()
            contribution = [p.summed_grad - prev for p, prev in zip(params, previous)]
            norm = torch.cat([c.flatten() for c in contribution]).norm()
            assert norm <= clip * (1 + 1e-5)
            assert norm >= clip * 0.99  # clipped to the bound, not below it
            previous = [p.summed_grad.clone() for p in params]
            total = total + norm
            optimizer.zero_grad(set_to_none=True)
    assert total > 0


def test_added_noise_has_the_expected_standard_deviation():
    """An empty Poisson batch: the update is pure noise N(0, σ²C²) divided by the expected batch size."""
    sigma, clip, expected = 1.5, 0.5, 8
    model = small_model("resnet9")
    optimizer = dp_optimizer(model, sigma=sigma, clip=clip, expected_batch=expected, lr=1.0)
    before = _flat(model)
    empty = (torch.zeros(0, 1, 3, 32, 32), torch.zeros(0, dtype=torch.long))
    logical_step(model, optimizer, [empty], num_chunks=1, private=True, batch_size=0)
    noise = (before - _flat(model)) * expected  # lr = 1
    assert noise.numel() > 50_000  # std of the estimate ≈ 1/sqrt(2n) ≈ 0.3%
    assert noise.mean().abs() < 0.01 * sigma * clip
    assert noise.std() == pytest.approx(sigma * clip, rel=0.01)


def test_same_noise_seed_gives_the_same_update():
    views, labels = random_batch()
    results = []
    for _ in range(2):
        model = small_model()
        logical_step(model, dp_optimizer(model, 1.0, 1.0, 6, seed=7), [(views, labels)], 1, True, 6)
        results.append(_flat(model))
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("name", ["eq_resnet9", "wrn16_4"])
def test_both_engines_give_the_same_dp_update_for_the_same_noise_seed(name):
    """Clipping really binds (clip 0.05) and the noise is real (σ = 1): the engines differ only in
    how the per-example gradients are computed, so the updates agree to float rounding."""
    views, labels = random_batch()
    updates = {}
    for engine in ("hooks", "vmap"):
        model = small_model(name)
        before = _flat(model)
        optimizer = dp_optimizer(model, 1.0, 0.05, 6, seed=7)
        logical_step(model, optimizer, [(views[:4], labels[:4]), (views[4:], labels[4:])], 2, True, 6, engine=engine)
        updates[engine] = _flat(model) - before
    assert updates["hooks"].norm() > 0
    assert relative_error(updates["hooks"], updates["vmap"]) < 1e-5


# ---------------------------------------------------------------------------------------------- EMA, eval


def test_ema_and_parameter_swap():
    model = small_model("resnet9")
    ema = WeightEMA(model, decay=0.5)
    start = {k: v.clone() for k, v in ema.values.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)  # warm-up decay min(0.5, 1/10) = 0.1
    name = next(iter(start))
    assert torch.allclose(ema.values[name], start[name] + 0.9)
    snapshot = _flat(model)
    with swapped_parameters(model, ema.values):
        assert not torch.equal(_flat(model), snapshot)
    assert torch.equal(_flat(model), snapshot)


def test_evaluation_uses_current_escnn_filters():
    """escnn caches filters in eval mode; evaluate must see parameters changed after that."""
    _, test = make_synthetic(8, 32, seed=0)
    model = small_model().eval()
    first = evaluate(model, test, torch.device("cpu"))
    with torch.no_grad():
        model.classifier.weight.mul_(0)
        model.conv1.conv.weights.add_(torch.randn_like(model.conv1.conv.weights))
        model.classifier.bias.copy_(torch.arange(10.0))
    accuracy, _ = evaluate(model, test, torch.device("cpu"))
    assert accuracy == pytest.approx(float((test.labels == 9).float().mean()))
    assert first != (accuracy, _)


def test_evaluation_uses_the_exported_filters_not_a_re_expansion_per_batch(monkeypatch):
    from dpeq_utils.models.equivariant import StandardizedR2Conv

    _, test = make_synthetic(8, 64, seed=0)
    model = small_model().train()
    calls = []
    original = StandardizedR2Conv.expand_parameters
    monkeypatch.setattr(StandardizedR2Conv, "expand_parameters", lambda self: calls.append(1) or original(self))
    evaluate(model, test, torch.device("cpu"), batch_size=16)  # 4 batches
    convs = sum(isinstance(m, StandardizedR2Conv) for m in model.modules())
    assert len(calls) == convs  # once per conv when entering eval mode, not once per batch


# ---------------------------------------------------------------------------------------------- whole runs

TINY = dict(train_size=128, test_size=32, batch_size=32, physical_batch_size=16, update_steps=3, widths=[4, 8, 16],
            eval_every=2, aug_mult=2, device="cpu")  # exact comparisons: the CPU, whatever a machine has


def test_tiny_private_run_record(tmp_path):
    config = config_from_profile("smoke", **TINY)
    record = load_or_run(config, runs_dir=tmp_path, progress=False)
    assert all(field in record for field in REQUIRED_FIELDS)
    assert record["epsilon_spent"] <= config.target_epsilon
    assert record["epsilon_spent"] >= 0.99 * config.target_epsilon
    assert record["sample_rate"] == 32 / 128 and record["steps"] == 3
    assert 0 < record["noise_multiplier"] < 10
    assert 0.0 <= record["test_accuracy"] <= 1.0 and 0.0 <= record["test_accuracy_ema"] <= 1.0
    assert [h["step"] for h in record["history"]] == [0, 2, 3]  # step 0: where the learning curve starts
    assert record["history"][0]["epsilon"] == 0.0
    assert record["history"][1]["epsilon"] < record["history"][2]["epsilon"] == record["epsilon_spent"]
    assert 10 <= record["mean_batch_size"] <= 60  # Poisson around 32
    assert record["per_sample_engine"] == "hooks" and record["config"]["per_sample_engine"] == "auto"
    on_disk = json.loads(record_path(config, tmp_path).read_text())
    assert on_disk["key"] == config_key(config) and on_disk["config"]["widths"] == [4, 8, 16]
    assert [p.name for p in tmp_path.iterdir()] == [record_path(config, tmp_path).name], "no temporary files"

    # load_or_run does not train again; the same config on another device shares the record
    assert load_or_run(config.replace(device="cpu"), runs_dir=tmp_path)["created"] == record["created"]
    table = results_table(tmp_path)
    assert len(table) == 1 and table.loc[0, "model"] == "eq_resnet9"


def test_cpu_runs_are_repeatable(tmp_path):
    config = config_from_profile("smoke", **{**TINY, "update_steps": 2, "eval_every": 0})
    first = load_or_run(config, runs_dir=tmp_path / "a", progress=False)
    second = load_or_run(config, runs_dir=tmp_path / "b", progress=False)
    assert first["history"][-1]["test_loss_ema"] == second["history"][-1]["test_loss_ema"]
    assert first["test_loss"] == second["test_loss"]
    assert all("train_loss" not in entry for entry in first["history"]), "a private batch's loss is no DP release"


def test_non_private_reference_run(tmp_path):
    config = config_from_profile("smoke", **{**TINY, "non_private": True, "model": "resnet9_matched"})
    record = load_or_run(config, runs_dir=tmp_path, progress=False)
    assert record["epsilon_spent"] is None and record["noise_multiplier"] == 0.0
    assert all(h["epsilon"] is None for h in record["history"])


def test_bad_configs_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of update_steps and epochs"):
        RunConfig(update_steps=10, epochs=2.0)
    with pytest.raises(ValueError, match="unknown run config field"):
        config_from_profile("smoke", learning_rate=1.0)
    with pytest.raises(ValueError, match="unknown profile"):
        config_from_profile("huge")
    with pytest.raises(ValueError, match="target_epsilon must be a positive"):
        RunConfig(target_epsilon=-1)
    with pytest.raises(ValueError, match="group C1 has no subgroup"):
        RunConfig(group="C1", restrict=True)
    with pytest.raises(ValueError, match="batch_size=256 exceeds the 128"):
        load_or_run(config_from_profile("smoke", **{**TINY, "batch_size": 256}), runs_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="not below 1/N"):
        load_or_run(config_from_profile("smoke", **{**TINY, "target_delta": 0.01}), runs_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == [], "a refused run leaves no record"


def test_yaml_spellings_give_one_key():
    assert parse_assignment("target_delta=1e-5") == ("target_delta", "1e-5")  # YAML 1.1 reads this as a string
    assert config_key(RunConfig(target_delta="1e-5", target_epsilon=8)) == config_key(RunConfig(target_delta=1e-5, target_epsilon=8.0))


@pytest.mark.slow
def test_smoke_cli_writes_a_valid_record(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dpeq_utils", "train", "--profile", "smoke", "--runs-dir", str(tmp_path),
                             "--no-progress", "--set", "update_steps=4"],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip().splitlines()[-1])
    record = json.loads(path.read_text())
    assert path.parent == tmp_path and all(field in record for field in REQUIRED_FIELDS)
    assert record["epsilon_spent"] <= record["config"]["target_epsilon"] == 8.0
    assert record["config"]["profile"] == "smoke" and record["steps"] == 4


def test_cli_reports_bad_overrides():
    result = subprocess.run([sys.executable, "-m", "dpeq_utils", "train", "--set", "lr=-1"], capture_output=True,
                            text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2 and "lr must be a positive" in result.stderr


def test_records_store_non_finite_values_as_null(tmp_path):
    from dpeq_utils.records import write_json_atomic

    write_json_atomic(tmp_path / "r.json", {"loss": float("nan"), "history": [{"x": float("inf"), "y": 1.0}]})
    assert json.loads((tmp_path / "r.json").read_text()) == {"loss": None, "history": [{"x": None, "y": 1.0}]}


def test_physical_batch_size_changes_no_random_draw_and_only_float_rounding(tmp_path):
    """physical_batch_size is not in the record key, so it must not change what a run draws: the batch,
    the views and the noise are the same bits whatever the chunking. What remains is float32
    rounding: oneDNN (and PyTorch's native convolution) give a chunk's examples results that differ in
    the last bit from the same examples in a larger chunk (measured up to ~2e-6 in the logits), and
    the chunks' clipped sums are added in another order, so the results agree to rounding, not bit
    for bit.
    """
    base = config_from_profile("smoke", **{**TINY, "eval_every": 0, "update_steps": 3, "aug_mult": 3,
                                           "physical_batch_size": 32})
    records = [load_or_run(base.replace(physical_batch_size=size), runs_dir=tmp_path / str(size), progress=False)
               for size in (32, 7, 1)]
    assert config_key(base.replace(physical_batch_size=7)) == config_key(base)
    assert records[0]["mean_batch_size"] > 7, "the check needs batches that really get split"
    for record in records[1:]:
        for field in ("mean_batch_size", "noise_multiplier", "sample_rate", "steps", "epsilon_spent", "num_params"):
            assert record[field] == records[0][field], field
        for field in ("test_loss", "test_accuracy"):
            assert abs(record[field] - records[0][field]) <= 1e-5 * abs(records[0][field]), field
        for field in ("test_loss_ema",):
            assert abs(record["history"][-1][field] - records[0]["history"][-1][field]) <= 1e-5 * records[0]["history"][-1][field]


def test_views_do_not_depend_on_how_the_batch_is_split():
    from dpeq_utils.data import apply_views, draw_views

    images = torch.randn(10, 3, 8, 8)
    draws = draw_views(10, 4, torch.Generator().manual_seed(3))
    whole = apply_views(images, draws)
    parts = torch.cat([apply_views(images[i:i + 3], draws[i:i + 3]) for i in range(0, 10, 3)])
    assert torch.equal(whole, parts)
    assert torch.equal(whole, augment_views(images, 4, torch.Generator().manual_seed(3)))


def test_default_config_describes_a_run_that_works():
    """``RunConfig()`` passes every check the trainer makes before training, and takes a step."""
    from dpeq_utils.train import setup, train_step

    state = setup(RunConfig(device="cpu"))
    assert state.sample_rate == 256 / 5000 and state.steps == 20 and 0 < state.budget.noise_multiplier < 10
    losses = train_step(state)
    assert len(losses) == state.batch_sizes[0] and state.budget.steps_taken == 1


def test_secure_mode_keeps_batches_views_and_noise_secret(tmp_path):
    """Seeded streams can be rebuilt from a record's seed: every batch's members, every view, then the
    noise. In secure mode the sampler, augmentation and noise come from the OS: two runs of one config
    draw other batches and noise, no checkpoint holds their states, the record carries no fingerprint
    of the training data, and the mode is part of the key."""
    from dpeq_utils.batches import poisson_batch
    from dpeq_utils.run_state import SECRET_STREAMS
    from dpeq_utils.train import fit, setup, train_step

    config = config_from_profile("smoke", **{**TINY, "update_steps": 2, "eval_every": 0, "secure_noise": True})
    first, second = fit(config, progress=False)[0], fit(config, progress=False)[0]
    assert not torch.equal(_flat(first), _flat(second))
    states = [setup(config) for _ in range(2)]
    batches = [poisson_batch(1000, 0.5, s.generators["sampler"]) for s in states]
    assert not torch.equal(batches[0], batches[1]), "the batch cannot be rebuilt from the seed"
    seeded = [setup(config.replace(secure_noise=False)) for _ in range(2)]
    assert torch.equal(*(poisson_batch(1000, 0.5, s.generators["sampler"]) for s in seeded))  # the contrast
    train_step(states[0])
    saved = states[0].state_dict()["generators"]
    assert not set(SECRET_STREAMS) & set(saved) and set(saved) == {"variants"}
    record = run(config, tmp_path, progress=False)
    assert "train_sha256" not in record["data"] and "test_sha256" in record["data"]
    assert "train_sha256" in run(config.replace(secure_noise=False), tmp_path, progress=False)["data"]
    assert config_key(config) != config_key(config.replace(secure_noise=False))
    assert config_key(config.replace(secure_noise=False)) == config_key(RunConfig(**{
        k: v for k, v in config.to_dict().items() if k != "secure_noise"}))  # old records keep their keys


def test_the_measured_signal_is_the_length_of_the_mean_clipped_gradient():
    """Identical examples: every clipped gradient is the same vector, so the mean pairwise cosine is 1
    and the signal is that vector's length (at most C); distinct examples point elsewhere."""
    from dpeq_utils.mechanism import signal_and_noise
    from dpeq_utils.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet9", widths=(4, 8, 8)).train()
    image, label = torch.randn(1, 3, 32, 32), torch.tensor([3])
    same = signal_and_noise(model, image.repeat(8, 1, 1, 1), label.repeat(8), 1.0, 1.0, 256)
    assert same["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert same["signal_norm"] == pytest.approx(min(1.0, same["median gradient norm"]), rel=1e-5)
    assert same["noise_norm"] == pytest.approx(1.0 * 1.0 * same["parameters"] ** 0.5 / 256)
    mixed = signal_and_noise(model, torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)), 1.0, 1.0, 256)
    assert mixed["mean_cosine"] < 0.9 and mixed["signal_norm"] < same["signal_norm"]
    assert mixed["noise_to_signal"] > mixed["noise_to_max_signal"]


def test_when_every_gradient_is_clipped_the_signal_is_set_by_alignment_alone():
    """All rows longer than C: the signal is C·√(mean cosine), whatever the number of coordinates, so
    two sets of gradients with equal alignment keep equal signals in 27 or in 108 coordinates."""
    from dpeq_utils.mechanism import clipped_signal

    generator = torch.Generator().manual_seed(0)
    for d in (27, 108):
        common = torch.randn(d, dtype=torch.float64, generator=generator)
        rows = 5 * (common + 2 * torch.randn(40, d, dtype=torch.float64, generator=generator))
        measured = clipped_signal(rows, 0.5)
        assert measured["clipped"] == 1.0 and 0 < measured["mean_cosine"] < 1
        assert measured["signal_norm"] == pytest.approx(0.5 * measured["mean_cosine"] ** 0.5, rel=1e-5)
    with pytest.raises(ValueError, match="two examples"):
        clipped_signal(torch.ones(1, 3), 1.0)


def test_measuring_along_a_run_does_not_change_the_run(tmp_path):
    """The measurements along training work on a copy with the global generators restored: the run
    ends where the same run trained without them ends; the record is verified when read back."""
    from dpeq_utils.mechanism import load_or_measure_along_training
    from dpeq_utils.records import RecordError
    from dpeq_utils.train import fit

    config = config_from_profile("smoke", **{**TINY, "eval_every": 0, "aug_mult": 1})
    model, plain = fit(config, progress=False)
    record = load_or_measure_along_training(config, [0, 1, 3], probes=2, probe_size=8, runs_dir=tmp_path)
    assert record["test_accuracy"] == plain["test_accuracy"] and record["test_accuracy_ema"] == plain["test_accuracy_ema"]
    assert [p["step"] for p in record["points"]] == [0, 1, 3] and record["points"][0]["epsilon"] == 0.0
    assert record["points"][-1]["epsilon"] == pytest.approx(plain["epsilon_spent"])
    for point in record["points"]:
        assert point["noise_norm"] == pytest.approx(record["noise_multiplier"] * config.clip_norm
                                                    * record["parameters"] ** 0.5 / config.batch_size)
        assert point["signal_norm"] == pytest.approx(sum(point["signal_norm_probes"]) / 2)
    again = load_or_measure_along_training(config, [3, 1, 0], probes=2, probe_size=8, runs_dir=tmp_path,
                                           train_missing=False)
    assert again["digest"] == record["digest"], "read back, not measured again"
    path = Path(record["source"])
    path.write_text(path.read_text().replace('"probe_size": 8', '"probe_size": 9'))
    with pytest.raises(RecordError, match="digest"):
        load_or_measure_along_training(config, [0, 1, 3], probes=2, probe_size=8, runs_dir=tmp_path)
    assert load_or_measure_along_training(config, [0, 2], probes=2, probe_size=8, runs_dir=tmp_path,
                                          train_missing=False) is None
