"""The device path, exercised in CI on a GPU simulated on the CPU (tests/simulated_device.py): a run's
tensors live on the "device", mixing them with CPU tensors raises as CUDA would, CPU generators may
not draw device tensors, and every host sync is counted.

Each run below trains, stops, resumes from its checkpoint and finishes on the simulated device, and
must end exactly where the same run ends uninterrupted on it (the simulation computes on the CPU, so
bit for bit is the right test of the resume path); the state a checkpoint restores (EMA, pruning
masks, ModelMix's previous iterate, momentum) must be back on the device.

``DPEQ_TEST_DEVICE=cuda`` runs the same tests on a real GPU instead (``benchmarks/gpu_check.py`` does,
with ``deterministic=True`` runs); the sync counts exist only in the simulation.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from simulated_device import DeviceTensor, simulated_device

import dpeq_utils.train as train_module
from dpeq_utils.checkpoint import read_checkpoint
from dpeq_utils.config import RunConfig
from dpeq_utils.records import record_path
from dpeq_utils.runs import run

DEVICE = os.environ.get("DPEQ_TEST_DEVICE", "meta")  # "meta": the simulated device (tests/simulated_device.py)
SIMULATED = torch.device(DEVICE).type == "meta"
SIM = DEVICE
only_simulated = pytest.mark.skipif(not SIMULATED, reason="counts what only the simulated device can count")
BASE = RunConfig(profile="device", dataset="synthetic", train_size=48, test_size=16, model="resnet9", widths=(4, 4, 4),
                 batch_size=12, physical_batch_size=12, aug_mult=1, update_steps=2, eval_every=0, lr=0.5, device=SIM,
                 checkpoint_every=1, deterministic=True)
#: Every kind of state a checkpoint restores, in four runs (each trains 2 + 1 + 1 steps on the simulated device)
RUNS = {
    "paper model (eq_resnet9, D4 restricted), momentum, EMA horizons, validation": {
        "model": "eq_resnet9", "widths": (2, 2, 2), "momentum": 0.9, "ema_horizons": (0.9,), "validation_size": 8},
    "WRN-16-4 (GroupNorm + weight standardisation), pruning + random dropping": {
        "model": "wrn16_4", "prune_rate": 0.3, "drop_rate": 0.2, "drop_method": "random"},
    "ModelMix, 2 views in 2 chunks": {"modelmix": True, "aug_mult": 2, "physical_batch_size": 6},
    "non-private": {"non_private": True},
}
TIMINGS = ("wall_time_s", "train_time_s", "created", "digest", "resumed_at_steps", "git_commit")


class Stop(Exception):
    """A run that dies right after a step (as on a preempted GPU node)."""


def _comparable(record: dict) -> dict:
    kept = {k: v for k, v in record.items() if k not in TIMINGS}
    kept["history"] = [{k: v for k, v in h.items() if k not in ("elapsed_s", "eval_time_s")} for h in record["history"]]
    return kept


@contextlib.contextmanager
def on_the_device(monkeypatch):
    """The simulated device (yields its sync counter), or nothing to do on a real one."""
    if SIMULATED:
        with simulated_device(monkeypatch) as mode:
            yield mode
    else:
        yield None


def _on_device(value) -> bool:
    if isinstance(value, torch.Tensor):
        return isinstance(value, DeviceTensor) if SIMULATED else value.device.type == torch.device(DEVICE).type
    if isinstance(value, dict):
        return all(_on_device(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_on_device(v) for v in value)
    return True


@pytest.mark.parametrize("name", RUNS)
def test_a_run_on_the_device_resumes_there_and_ends_where_the_uninterrupted_run_ends(name, tmp_path, monkeypatch):
    config = BASE.replace(**RUNS[name])
    with on_the_device(monkeypatch):
        reference = run(config, tmp_path / "uninterrupted", progress=False)
        original = train_module.train_step
        resumed_states = []

        def dying(state):
            if state.step == 1 and not state.resumes:
                raise Stop  # after step 1, whose checkpoint is on disk
            losses = original(state)
            if state.resumes:
                resumed_states.append(state)
            return losses

        monkeypatch.setattr(train_module, "train_step", dying)
        folder = tmp_path / "interrupted"
        with pytest.raises(Stop):
            run(config, folder, progress=False)
        assert read_checkpoint(record_path(config, folder).with_suffix(".ckpt"))["state"]["step"] == 1
        resumed = run(config, folder, progress=False)  # resumes at step 1, then step 2 on the device
    state = resumed_states[-1]
    assert resumed["resumed_at_steps"] == [1]
    assert _comparable(resumed) == _comparable(reference)
    assert all(_on_device(p) for p in state.model.parameters())
    assert _on_device(state.ema.values) and all(_on_device(e.values) for e in state.horizons.values())
    assert _on_device(state.optimizer.state_dict()["state"])  # momentum buffers, where there are any
    for variant in state.variants:
        for tensors in vars(variant).values():
            if isinstance(tensors, dict) and tensors and isinstance(next(iter(tensors.values())), torch.Tensor):
                assert _on_device(tensors), f"{type(variant).__name__}'s state was left on the host"


#: Host syncs a DP step may make on a GPU, whatever the number of chunks: the dispatch of a step reads
#: nothing back from the device (the losses stay there, the chunk indices and view draws are copied
#: without blocking). What remains is explicit: one ``torch.cuda.synchronize`` at the end of each
#: step (so that ``train_time_s`` times the step's work; the simulation does not count it), and none
#: here. A ceiling of 0 counted syncs per step, for every chunk count and for pruning + dropping.
SYNC_CEILING = 0


@pytest.mark.parametrize("chunk, change", [(12, {}), (3, {"prune_rate": 0.3, "drop_rate": 0.2, "drop_method": "magnitude"}),
                                           (3, {"modelmix": True, "aug_mult": 2})])
@only_simulated
def test_a_dp_step_on_the_device_reads_nothing_back_from_it(chunk, change, monkeypatch):
    config = BASE.replace(physical_batch_size=chunk, **change)
    with simulated_device(monkeypatch) as device:
        state = train_module.setup(config)
        train_module.train_step(state)  # the first step builds per-device constants once
        device.syncs.clear()
        train_module.train_step(state)
        assert device.sync_count <= SYNC_CEILING, dict(device.syncs)
        train_module.evaluate_run(state)
        assert device.sync_count <= 4, f"an evaluation reads its sums back once per model scored: {dict(device.syncs)}"


@only_simulated
def test_the_simulation_catches_what_cuda_refuses(monkeypatch):
    """The harness is only worth its tests if it fails where CUDA fails: mixed devices, a CPU
    generator drawing device tensors, and it counts reads as syncs."""
    with simulated_device(monkeypatch) as device:
        on_device = torch.ones(3).to(SIM)
        assert device.sync_count == 1, "a blocking copy to the device"
        device.syncs.clear()
        with pytest.raises(RuntimeError, match="same device"):
            on_device + torch.ones(3)
        assert float((on_device + torch.tensor(2.0)).sum()) == 9.0  # a CPU scalar mixes, as on CUDA; float() syncs
        with pytest.raises(RuntimeError, match="generator"):
            torch.randn(3, device=SIM, generator=torch.Generator().manual_seed(1))
        torch.randn(3, device=SIM, generator=torch.Generator(device=SIM).manual_seed(2))
        assert device.sync_count == 1


def test_the_memory_preflight_refuses_a_run_the_device_cannot_hold(monkeypatch):
    """On a GPU the run's own model is measured on the device and the run refused, with one sentence,
    before its first step (the simulation has no memory statistics: the device's answers are stood in)."""
    from dpeq_utils import preflight
    from dpeq_utils.preflight import PreflightError

    measured = {}

    def chunk_mb(config, model, examples, device):
        measured[examples] = str(device)
        return 100.0 * examples  # MB per example, as measured
    monkeypatch.setattr(preflight, "measured_chunk_mb", chunk_mb)
    monkeypatch.setattr(preflight, "device_free_mb", lambda device: 2_000.0)
    monkeypatch.setattr(train_module, "train_step", lambda state: pytest.fail("a step ran before the refusal"))
    with on_the_device(monkeypatch):
        with pytest.raises(PreflightError) as refused:
            train_module.setup(BASE.replace(physical_batch_size=64))
        message = str(refused.value)
        assert "on the GPU" in message and "physical_batch_size (now 64" in message and "\n" not in message
        assert measured == {1: str(torch.device(DEVICE)), 2: str(torch.device(DEVICE))}
        train_module.setup(BASE.replace(physical_batch_size=8))  # 8 × 100 MB × 1.2 fits in 2 GB


def test_the_gpu_random_state_is_restored_into_the_runs_own_device(monkeypatch):
    """A checkpoint keeps the CUDA generator state of the run's GPU only, and restores it into the
    resumed run's GPU: a run resumed where fewer GPUs are visible never asks for another ordinal."""
    from dpeq_utils import run_state

    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([int(device.index)], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((int(state[0]), str(device))))
    saved = run_state.global_generator_states(torch.device("cuda", 3))
    assert "cuda_device" in saved and "cuda" not in saved
    run_state.set_global_generator_states(saved, torch.device("cuda", 0))
    assert calls == [(3, "cuda:0")]
    run_state.set_global_generator_states(run_state.global_generator_states(torch.device("cpu")), torch.device("cuda"))
    assert calls == [(3, "cuda:0")], "a checkpoint written on a CPU sets no GPU state"


def test_gradient_canaries_and_the_mechanism_measurement_run_on_the_device(monkeypatch, tmp_path):
    from dpeq_utils.audit import _train_audited
    from dpeq_utils.mechanism import measure_along_training

    with on_the_device(monkeypatch):
        audited = _train_audited(BASE, canary_count=8, seed=0, breakage=None, label="device", gradient_canaries=40)
        assert len(audited["gradient_canaries"]["scores"]) == 40 and len(audited["scores"]) == 8
        body = measure_along_training(BASE, [0, 2], probes=2, probe_size=4)
        assert [p["step"] for p in body["points"]] == [0, 2] and all(p["noise_norm"] > 0 for p in body["points"])
