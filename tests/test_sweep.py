"""Sweeps through submitit: the local executor end to end, the Slurm path against a fake
sbatch/sacct (as submitit tests itself), and a preempted job that resumes to the same record."""

import os
import re
import signal
import time
from pathlib import Path

import pytest
from conftest import CodePayload

pytest.importorskip("submitit")

from submitit.core import submission  # noqa: E402
from submitit.core.test_core import MockedSubprocess  # noqa: E402

from dpeq_utils.checkpoint import checkpoint_path  # noqa: E402
from dpeq_utils.config import RunConfig  # noqa: E402
from dpeq_utils.records import read_record, record_path
from dpeq_utils.runs import run  # noqa: E402
from dpeq_utils.sweep import RunJob, expand_grid, main, make_executor, plan, status_table, submit  # noqa: E402

TINY = RunConfig(profile="tiny", dataset="synthetic", train_size=128, test_size=64, model="resnet9", widths=(4, 8, 8),
                 batch_size=32, physical_batch_size=32, aug_mult=1, update_steps=3, lr=0.5, device="cpu")
TIMINGS = ("wall_time_s", "train_time_s", "created", "digest", "resumed_at_steps", "git_commit", "history")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_grids_are_checked():
    with pytest.raises(ValueError, match="non-empty list"):
        expand_grid(TINY, ["seed=3"])
    with pytest.raises(ValueError, match="twice"):
        expand_grid(TINY, ["seed=[1]", "seed=[2]"])
    with pytest.raises(ValueError, match="unknown run config field"):
        expand_grid(TINY, ["seeds=[1]"])
    assert len(expand_grid(TINY, ["seed=[0,1,2]", "model=[resnet9,resnet9_matched]"])) == 6


@pytest.mark.slow
def test_local_sweep_runs_what_is_missing_at_most_n_at_a_time(tmp_path):
    configs = expand_grid(TINY, ["seed=[0,1,2]"])
    run(configs[0], tmp_path, progress=False)  # one record exists already
    todo = [p.config for p in plan(configs, tmp_path) if p.status != "done"]
    assert [c.seed for c in todo] == [1, 2]
    executor = make_executor("local", tmp_path / "logs")
    jobs = submit(executor, todo, tmp_path, concurrency=2, echo=lambda _: None)
    results = [job.result() for job in jobs]
    assert sorted(r["record"] for r in results) == sorted(str(record_path(c, tmp_path)) for c in todo)
    assert all(p.status == "done" for p in plan(configs, tmp_path))
    assert [row["status"] for row in status_table(tmp_path, tmp_path / "logs")] == ["done"] * 3


def test_debug_executor_runs_in_this_process(tmp_path):
    jobs = submit(make_executor("debug", tmp_path / "logs"), [TINY], tmp_path)
    assert jobs[0].result()["record"] == str(record_path(TINY, tmp_path))
    assert read_record(record_path(TINY, tmp_path))["steps"] == 3


def test_slurm_array_job_is_written_as_asked_and_its_tasks_run(tmp_path):
    configs = expand_grid(TINY, ["seed=[0,1,2]"])
    mock = MockedSubprocess(known_cmds=["srun"])
    try:
        with mock.context():
            executor = make_executor("slurm", tmp_path / "logs", partition="gpu", gpus_per_run=1, time_min=240,
                                     array_parallelism=2, cpus_per_run=8)
            jobs = submit(executor, configs, tmp_path)
            scripts = list((tmp_path / "logs").rglob("*_submission.sh"))
            assert len(scripts) == 1, scripts  # one array job
            sbatch = scripts[0].read_text()
            for line in ("#SBATCH --array=0-2%2", "#SBATCH --gpus-per-node=1", "#SBATCH --partition=gpu",
                         "#SBATCH --time=240", "#SBATCH --cpus-per-task=8", "#SBATCH --signal=USR2@120"):
                assert line in sbatch, (line, sbatch)
            assert len({job.job_id.split("_")[0] for job in jobs}) == 1  # one array job
        for job in jobs:  # what each array task would run on a node, outside the mock
            with mock.job_context(job.job_id):
                submission.process_job(job.paths.folder)
            assert job.result()["record"] == str(record_path(configs[int(job.job_id.split("_")[1])], tmp_path))
    finally:
        from submitit.slurm import slurm
        slurm.SlurmJob.watcher.clear()
    assert all(p.status == "done" for p in plan(configs, tmp_path))


@pytest.mark.slow
def test_a_preempted_local_job_checkpoints_requeues_and_ends_as_if_uninterrupted(tmp_path):
    config = TINY.replace(update_steps=40, checkpoint_every=1)
    reference = run(config, tmp_path / "uninterrupted", progress=False)
    folder = tmp_path / "preempted"
    executor = make_executor("local", tmp_path / "logs")
    job = executor.submit(RunJob(config.to_dict(), str(folder)))
    path = checkpoint_path(record_path(config, folder))
    deadline = time.monotonic() + 120
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in _children(int(job.job_id)):  # the job's task (submitit's local controller does not forward USR2)
        os.kill(pid, signal.SIGUSR2)  # what Slurm sends on preemption
    result = job.result()
    record = read_record(record_path(config, folder))
    assert record["resumed_at_steps"], "the job was not interrupted (it finished first?)"
    assert result["test_accuracy"] == reference["test_accuracy"]
    same = {k: v for k, v in record.items() if k not in TIMINGS}
    assert same == {k: v for k, v in reference.items() if k not in TIMINGS}
    assert "Requeued" in job.stderr() or "requeue" in (job.stderr() or "").lower()


def test_the_cli_dry_run_plans_and_submits_nothing(tmp_path, capsys):
    assert main(["--profile", "smoke", "--grid", "seed=[0,1]", "--runs-dir", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 runs: 0 done (skipped), 0 resumable, 2 missing; 2 to submit to local" in out
    assert "estimate: unknown" in out and "--throughput" in out
    assert not list(tmp_path.glob("*.json"))
    assert main(["--profile", "smoke", "--grid", "seed=[0,1]", "--runs-dir", str(tmp_path), "--dry-run",
                 "--throughput", "1024"]) == 0
    smoke_views = 8 * 64 * 2  # steps × batch × views of the smoke profile, per run
    assert f"{2 * smoke_views / 1024 / 3600:.2g} device hours" in capsys.readouterr().out



def test_status_reads_no_foreign_pickle_and_one_bad_file_is_one_row(tmp_path):
    import pickle

    run(TINY, tmp_path, progress=False)
    (tmp_path / "resnet9-D4-0123456789abcdef.json").write_text('{"key": ')  # a truncated record
    marker = tmp_path / "payload-ran"
    job = tmp_path / "sweep-logs" / "123"
    job.mkdir(parents=True)
    (job / "123_0_result.pkl").write_bytes(pickle.dumps(("error", CodePayload(marker))))
    (tmp_path / "sweep-logs" / "124").mkdir()
    (tmp_path / "sweep-logs" / "124" / "124_0_result.pkl").write_bytes(
        pickle.dumps(("error", "Traceback ...\nRuntimeError: run resnet9-D4-abc failed: ValueError: bad")))
    rows = {row["run"]: row["status"] for row in status_table(tmp_path)}
    assert not marker.exists()
    assert rows[record_path(TINY, tmp_path).stem] == "done"
    assert rows["resnet9-D4-0123456789abcdef"].startswith("bad record")
    assert "unreadable result" in rows["job 123"] and "123_0_result.pkl" in rows["job 123"]
    assert rows["job 124"] == "failed: RuntimeError: run resnet9-D4-abc failed: ValueError: bad"


def test_status_tells_a_live_lock_from_a_stale_one(tmp_path):
    """A process killed with SIGKILL leaves its lock file; flock was released by the OS with it."""
    import fcntl
    import subprocess
    import sys

    stale = tmp_path / "resnet9-D4-aaaaaaaaaaaaaaaa.json.lock"
    process = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"h = open({str(stale)!r}, 'a+'); fcntl.flock(h, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    live = tmp_path / "resnet9-D4-bbbbbbbbbbbbbbbb.json.lock"
    with open(live, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        process.kill()
        process.wait()
        rows = {row["run"]: row["status"] for row in status_table(tmp_path)}
    assert rows["resnet9-D4-bbbbbbbbbbbbbbbb"] == "running (no checkpoint yet)"
    assert rows["resnet9-D4-aaaaaaaaaaaaaaaa"].startswith("stale lock")


def test_a_failed_job_names_its_run(tmp_path, monkeypatch):
    bad = TINY.replace(dataset="cifar10")
    job = RunJob(bad.to_dict(), str(tmp_path))
    monkeypatch.setenv("DPEQ_CIFAR10", str(tmp_path / "nowhere"))  # a CIFAR-10 copy that is not there
    with pytest.raises(RuntimeError, match=re.escape(f"run {record_path(bad, tmp_path).stem} failed")):
        job()


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM])
def test_stopping_the_sweep_driver_stops_its_jobs_through_their_checkpoints(tmp_path, how):
    """Ctrl-C (or SIGTERM) to `sweep` must not orphan its local jobs: each ends its step, writes its
    checkpoint and exits; nothing of the sweep is left running, and the next sweep resumes the run."""
    import subprocess
    import sys

    config = TINY.replace(update_steps=5000, checkpoint_every=1)
    folder, logs = tmp_path / "runs", tmp_path / "logs"
    driver = subprocess.Popen([sys.executable, "-c", (
        "from dpeq_utils.config import RunConfig\nfrom dpeq_utils.sweep import make_executor, submit\n"
        f"submit(make_executor('local', {str(logs)!r}), [RunConfig(**{config.to_dict()!r})], {str(folder)!r})")],
        cwd=Path(__file__).resolve().parents[1])
    path = checkpoint_path(record_path(config, folder))
    deadline = time.monotonic() + 120
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), "the job never checkpointed"
    driver.send_signal(how)
    assert driver.wait(timeout=120) != 0

    def alive() -> list[str]:
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(logs) in text:
                found.append(text)
        return found
    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive() == [], "a job of the stopped sweep is still running"
    from dpeq_utils.checkpoint import read_checkpoint

    assert 0 < read_checkpoint(path)["state"]["step"] < config.update_steps
    assert status_table(folder)[0]["status"] == "resumable", "no lock left held"
