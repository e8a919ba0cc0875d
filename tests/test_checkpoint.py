"""Checkpoint and resume: an interrupted run, resumed, ends bit for bit where the uninterrupted run
ends; the privacy ledger survives; nothing corrupt, foreign or half-written is ever used."""

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CodePayload

import dpeq_utils.checkpoint as checkpoint_module
import dpeq_utils.run_state as run_state_module
import dpeq_utils.train as train_module
from dpeq_utils.checkpoint import CheckpointError, checkpoint_path, read_checkpoint
from dpeq_utils.config import RunConfig
from dpeq_utils.records import read_record, record_path
from dpeq_utils.runs import run

TINY = RunConfig(profile="tiny", dataset="synthetic", train_size=200, test_size=100, model="resnet9", widths=(4, 8, 8),
                 batch_size=32, physical_batch_size=16, aug_mult=2, update_steps=7, eval_every=2, lr=0.5,
                 device="cpu", checkpoint_every=3)
VARIANTS = {
    "dp-sgd, 2 views": {},
    "pruning + dropping": {"prune_rate": 0.3, "drop_rate": 0.2},
    "modelmix": {"modelmix": True},
    "equivariant, momentum, EMA horizons": {"model": "eq_resnet9", "group": "C4", "widths": (2, 2, 2),
                                            "momentum": 0.9, "ema_horizons": (0.9,)},
}
TIMINGS = ("wall_time_s", "train_time_s", "created", "digest", "resumed_at_steps", "git_commit")


class Crash(Exception):
    """Stands in for a process that dies (kill -9, power loss) right after a step."""


def _comparable(record: dict) -> dict:
    kept = {k: v for k, v in record.items() if k not in TIMINGS}
    kept["history"] = [{k: v for k, v in h.items() if k not in ("elapsed_s", "eval_time_s")} for h in record["history"]]
    return kept


def _stop_after(monkeypatch, step: int, how: str):
    """Make the trainer stop after ``step``: a crash once that step is complete (its checkpoint, if
    one was due, written), or a SIGINT arriving during it."""
    original = train_module.train_step

    def stepping(state):
        if how == "crash" and state.step == step:
            raise Crash
        losses = original(state)
        if how == "signal" and state.step == step:
            os.kill(os.getpid(), signal.SIGINT)  # held until the step ends, then a checkpoint, then Ctrl-C
        return losses
    monkeypatch.setattr(train_module, "train_step", stepping)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_an_interrupted_run_resumes_to_the_same_bits(variant, tmp_path, monkeypatch):
    config = TINY.replace(**VARIANTS[variant])
    reference = run(config, tmp_path / "uninterrupted", progress=False)
    folder = tmp_path / "interrupted"
    path = record_path(config, folder)
    # stopped three times: by a signal at a step that is no multiple of checkpoint_every (saves there),
    # by a crash at one that is (its checkpoint was written), by a crash after it (steps 5-6 are redone)
    for step, how in ((2, "signal"), (3, "crash"), (5, "crash")):
        with monkeypatch.context() as patch:
            _stop_after(patch, step, how)
            with pytest.raises(KeyboardInterrupt if how == "signal" else Crash):
                run(config, folder, progress=False)
        assert not path.exists()
        saved = read_checkpoint(checkpoint_path(path))["state"]
        assert saved["step"] == (step if how == "signal" else 3)
        assert saved["steps_taken"] == saved["step"]  # the ledger counts exactly the steps the checkpoint holds
    resumed = run(config, folder, progress=False)
    assert resumed["resumed_at_steps"] == [2, 3]  # the crashed third process left no checkpoint of its own
    assert _comparable(resumed) == _comparable(reference)
    assert resumed["epsilon_spent"] == reference["epsilon_spent"] <= config.target_epsilon
    assert not checkpoint_path(path).exists()  # the record is written, the checkpoint removed
    assert read_record(path)["resumed_at_steps"] == [2, 3]


def _checkpointed(tmp_path, monkeypatch, config=TINY):
    """A run stopped after step 4 with its checkpoint at step 3 on disk."""
    with monkeypatch.context() as patch:
        _stop_after(patch, 4, "crash")
        with pytest.raises(Crash):
            run(config, tmp_path, progress=False)
    return checkpoint_path(record_path(config, tmp_path))


@pytest.mark.parametrize("damage", ["truncated", "bit flipped", "not a checkpoint"])
def test_a_corrupt_checkpoint_is_reported_and_never_used(damage, tmp_path, monkeypatch):
    path = _checkpointed(tmp_path, monkeypatch)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "bit flipped":
        path.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
    else:
        path.write_bytes(b"{}")
    with pytest.raises(CheckpointError, match="corrupt|not a dpeq checkpoint") as caught:
        run(TINY, tmp_path, progress=False)
    assert "--no-resume" in str(caught.value)
    assert not record_path(TINY, tmp_path).exists()
    record = run(TINY, tmp_path, progress=False, resume=False)  # starting over works, and says so
    assert "resumed_at_steps" not in record and not path.exists()


def test_a_checkpoint_of_another_run_or_other_libraries_is_refused(tmp_path, monkeypatch):
    path = _checkpointed(tmp_path, monkeypatch)
    other = TINY.replace(lr=0.25)
    path.rename(checkpoint_path(record_path(other, tmp_path)))  # copied under another config's name
    with pytest.raises(CheckpointError, match="written with key"):
        run(other, tmp_path, progress=False)
    checkpoint_path(record_path(other, tmp_path)).rename(path)
    versions = checkpoint_module.library_versions()
    monkeypatch.setattr(checkpoint_module, "library_versions", lambda: {**versions, "opacus": "0.0.1"})
    expected = f"written with versions {{'opacus': '{versions['opacus']}'}}, this run has {{'opacus': '0.0.1'}}"
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        run(TINY, tmp_path, progress=False)
    assert path.exists()  # refused, not deleted: the user decides


def test_the_cli_resumes_and_no_resume_starts_over(tmp_path, monkeypatch, capsys):
    import yaml

    from dpeq_utils.runs import main as train_main

    profile = tmp_path / "tiny.yaml"
    run_fields = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.to_dict().items() if k != "profile"}
    profile.write_text(yaml.safe_dump({"description": "tiny", "run": run_fields}))
    folder = tmp_path / "runs"
    path = _checkpointed(folder, monkeypatch)
    args = ["--profile", str(profile), "--runs-dir", str(folder), "--no-progress"]
    assert train_main(args) == 0
    assert "resuming resnet9-D4-" in capsys.readouterr().err  # "... from step 3 of 7, ε spent so far ..."
    assert read_record(record_path(TINY, folder))["resumed_at_steps"] == [3]
    record_path(TINY, folder).unlink()
    _checkpointed(folder, monkeypatch)
    assert train_main(args + ["--no-resume"]) == 0
    assert "starting over" in capsys.readouterr().err
    assert "resumed_at_steps" not in read_record(record_path(TINY, folder)) and not path.exists()


def test_a_failed_periodic_checkpoint_keeps_training_and_the_last_checkpoint(tmp_path, monkeypatch):
    reference = run(TINY, tmp_path / "uninterrupted", progress=False)
    writes = []

    def disk_full_after_first(handle, data):
        writes.append(len(data))
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        handle.write(data)
    monkeypatch.setattr(checkpoint_module, "_write", disk_full_after_first)
    folder = tmp_path / "full"
    with pytest.warns(RuntimeWarning, match="could not write the checkpoint .* No space left"):
        _stop_after(monkeypatch, 6, "crash")
        with pytest.raises(Crash):
            run(TINY, folder, progress=False)
    path = checkpoint_path(record_path(TINY, folder))
    assert read_checkpoint(path)["state"]["step"] == 3  # the step-6 write failed; the step-3 one is intact
    assert not list(folder.glob(".*.tmp"))  # nothing half-written left behind
    monkeypatch.undo()
    resumed = run(TINY, folder, progress=False)
    assert _comparable(resumed) == _comparable(reference)


def test_a_temp_file_of_a_killed_write_is_ignored_and_cleaned(tmp_path, monkeypatch):
    path = _checkpointed(tmp_path, monkeypatch)
    stale = path.with_name(f".{path.name}.abc123.tmp")
    stale.write_bytes(path.read_bytes()[:1000])  # what a write killed half-way leaves
    record = run(TINY, tmp_path, progress=False)
    assert record["resumed_at_steps"] == [3] and not stale.exists()


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_gives_the_uninterrupted_record(tmp_path):
    """The real thing: a training process killed with SIGKILL, and the same command run again."""
    reference = run(TINY.replace(update_steps=12, checkpoint_every=2), tmp_path / "uninterrupted", progress=False)
    config = TINY.replace(update_steps=12, checkpoint_every=2)
    folder = tmp_path / "killed"
    script = (f"import time, dpeq_utils.train as t\n"
              f"from dpeq_utils.config import RunConfig\nfrom dpeq_utils.runs import run\n"
              f"original = t.train_step\n"
              f"def slow(state):\n    time.sleep(0.3)\n    return original(state)\n"
              f"t.train_step = slow\n"
              f"run(RunConfig(**{config.to_dict()!r}), {str(folder)!r}, progress=False)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-c", script], env=env)
    path = checkpoint_path(record_path(config, folder))
    deadline = time.monotonic() + 120
    while not path.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # past the first checkpoint, mid-way through later steps
    process.kill()
    process.wait()
    assert path.exists() and not record_path(config, folder).exists()
    resumed = run(config, folder, progress=False)
    assert resumed["resumed_at_steps"] and resumed["resumed_at_steps"][0] % 2 == 0
    assert _comparable(resumed) == _comparable(reference)


def test_deferred_signals_hand_the_signal_to_its_old_handler():
    received = []
    previous = signal.signal(signal.SIGUSR2, lambda number, frame: received.append(number))
    try:
        with train_module.deferred_signals() as held:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert held.pending == signal.SIGUSR2 and not received  # held during the step
            held.deliver()
            assert received == [signal.SIGUSR2]  # then delivered to the handler it had (submitit's on Slurm)
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_checkpoint_state_round_trips(tmp_path):
    state = train_module.setup(TINY)
    for _ in range(2):
        train_module.train_step(state)
    other = train_module.setup(TINY)
    other.load_state_dict(state.state_dict())
    for a, b in zip(state.model.parameters(), other.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert other.step == 2 and other.budget.steps_taken == 2
    assert torch.equal(other.generators["noise"].get_state(), state.generators["noise"].get_state())



def test_a_crafted_checkpoint_runs_no_code_and_is_named(tmp_path, monkeypatch):
    """A checkpoint with a valid header and a recomputed SHA-256 whose payload would run code: the
    SHA-256 proves nothing about the writer, so the loader must refuse the payload unread."""
    path = _checkpointed(tmp_path, monkeypatch)
    marker = tmp_path / "payload-ran"
    content = read_checkpoint(path)
    content["state"]["history"] = [CodePayload(marker)]
    checkpoint_module.write_checkpoint(path, content)  # header and SHA-256 as a real writer makes them
    with pytest.raises(CheckpointError, match=re.escape(str(path))) as caught:
        run(TINY, tmp_path, progress=False)
    assert not marker.exists() and "--no-resume" in str(caught.value)
    from dpeq_utils.sweep import status_table

    rows = status_table(tmp_path)  # the status view reads checkpoints too
    assert not marker.exists() and any("bad checkpoint" in row["status"] for row in rows)


def test_a_checkpoint_of_other_code_needs_consent_and_the_record_names_both(tmp_path, monkeypatch):
    path = _checkpointed(tmp_path, monkeypatch)
    ours = dict(checkpoint_module.CODE)
    edited = {"git_commit": "0" * 40 + "+dirty", "source_sha256": "f" * 64}
    for module in (checkpoint_module, run_state_module):
        monkeypatch.setattr(module, "CODE", edited)
    with pytest.raises(CheckpointError, match="written by other dpeq code.*--resume-other-code"):
        run(TINY, tmp_path, progress=False)
    assert path.exists()  # refused, not deleted
    record = run(TINY, tmp_path, progress=False, resume_other_code=True)
    assert record["code_history"] == [{"from_step": 0, **ours}, {"from_step": 3, **edited}]
    assert record["resumed_at_steps"] == [3]


def test_a_record_names_the_code_that_was_imported(tmp_path):
    from dpeq_utils.provenance import CODE, source_sha256

    record = run(TINY.replace(update_steps=1), tmp_path, progress=False)
    assert record["source_sha256"] == CODE["source_sha256"] == source_sha256()
    assert record["git_commit"] == CODE["git_commit"] and "code_history" not in record


def test_a_record_names_the_machine_and_a_resume_on_another_kind_of_cpu_is_listed(tmp_path, monkeypatch):
    """CPU kernels round differently across vector units: a record names the CPU it ran on (model, ISA,
    torch's CPU capability, threads); a run continued on another kind of CPU lists both, from the step
    where the second took over."""
    from dpeq_utils.machine import machine_kind

    here = machine_kind()
    record = run(TINY.replace(update_steps=1), tmp_path / "one", progress=False)
    assert record["machine"] == here and "machine_history" not in record
    assert record["machine"]["torch cpu capability"] == torch.backends.cpu.get_cpu_capability()
    _checkpointed(tmp_path, monkeypatch)
    elsewhere = {**here, "cpu": "Some other CPU", "torch cpu capability": "AVX2"}
    monkeypatch.setattr(train_module, "machine_kind", lambda device=None: elsewhere)
    record = run(TINY, tmp_path, progress=False)
    assert record["machine"] == elsewhere
    assert record["machine_history"] == [{"from_step": 0, "machine": here}, {"from_step": 3, "machine": elsewhere}]


def test_a_secure_run_resumes_with_fresh_entropy_and_says_so(tmp_path, monkeypatch, capsys):
    config = TINY.replace(secure_noise=True)
    path = _checkpointed(tmp_path, monkeypatch, config)
    assert not {"sampler", "augment", "noise"} & set(read_checkpoint(path)["state"]["generators"])
    record = run(config, tmp_path, progress=False)
    assert record["resumed_at_steps"] == [3] and record["epsilon_spent"] <= config.target_epsilon
    assert "fresh OS entropy" in capsys.readouterr().err


def test_a_secure_run_refuses_generator_states_written_into_its_checkpoint(tmp_path, monkeypatch):
    """Sampler, augmentation and noise states injected into a secure run's checkpoint (header and
    SHA-256 recomputed, as anyone can): resuming from them would make the run's batches and noise known
    to whoever wrote them, so the checkpoint is refused, named, and kept for the user to look at."""
    config = TINY.replace(secure_noise=True)
    path = _checkpointed(tmp_path, monkeypatch, config)
    content = read_checkpoint(path)
    for name, seed in (("sampler", 1), ("augment", 2), ("noise", 3)):
        content["state"]["generators"][name] = torch.Generator().manual_seed(seed).get_state()
    checkpoint_module.write_checkpoint(path, content)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*secure run.*augment, noise, sampler.*--no-resume"):
        run(config, tmp_path, progress=False)
    assert path.exists() and not record_path(config, tmp_path).exists()
    state = train_module.setup(config)  # and the trainer itself never loads them in a secure run
    fresh = {name: state.generators[name].get_state() for name in train_module.SECRET_STREAMS}
    state.load_state_dict(content["state"])
    assert all(torch.equal(state.generators[name].get_state(), fresh[name]) for name in fresh)


@pytest.mark.parametrize("craft", ["re-zipped with deflate", "history repeating one list", "history inside itself"])
def test_a_small_checkpoint_that_expands_to_gigabytes_is_refused_before_it_expands(craft, tmp_path, monkeypatch):
    """A checkpoint whose entries are deflated (torch.save stores them: a 32 MB tensor in a ~100 KB
    file), or whose history repeats one list inside itself (a few bytes of pickle, an astronomical
    record): refused within seconds, naming the file, before anything is inflated or copied into a run."""
    import io
    import zipfile

    path = _checkpointed(tmp_path, monkeypatch)
    content = read_checkpoint(path)
    if craft == "re-zipped with deflate":
        content["state"]["history"].append({"padding": torch.zeros(8 * 2 ** 20)})  # 32 MB of zeros
        buffer = io.BytesIO()
        torch.save(content, buffer)
        deflated = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as stored, \
                zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as rezipped:
            for entry in stored.infolist():
                rezipped.writestr(entry.filename, stored.read(entry))
        payload = deflated.getvalue()
        assert len(payload) < 2 ** 20
        path.write_bytes(f"{checkpoint_module.MAGIC} {checkpoint_module.FORMAT} ".encode()
                         + __import__("hashlib").sha256(payload).hexdigest().encode() + b"\n" + payload)
        monkeypatch.setattr(checkpoint_module.torch, "load", lambda *a, **k: pytest.fail("inflated before refusing"))
    else:
        nested: list = [{"step": 1}]
        if craft == "history repeating one list":
            for _ in range(12):
                nested = [nested] * 10  # 10^12 entries once expanded
        else:
            nested.append(nested)
        content["state"]["history"] = nested
        checkpoint_module.write_checkpoint(path, content)
        assert path.stat().st_size < 2 ** 20
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=re.escape(str(path))) as caught:
        read_checkpoint(path)
    assert time.perf_counter() - started < 2 and "\n" not in str(caught.value)
    from dpeq_utils.sweep import status_table

    assert [row["status"][:15] for row in status_table(tmp_path)] == ["bad checkpoint "], "not called resumable"
