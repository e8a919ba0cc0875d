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

from submitit.core.test_core import MockedSubprocess  # noqa: E402

from dpeq_utils.checkpoint import checkpoint_path  # noqa: E402
from dpeq_utils.config import RunConfig  # noqa: E402
from dpeq_utils.records import read_record, record_path
from dpeq_utils.runs import run  # noqa: E402
from dpeq_utils.sweep import RunJob, expand_grid, main, make_executor, outcomes, plan, status_table, submit  # noqa: E402
from dpeq_utils.sweep_job import SubmissionRefused, load_submission, process_job  # noqa: E402

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
    found = outcomes(jobs, todo, tmp_path)
    assert [o.error for o in found] == [None, None] and [o.record["seed"] for o in found] == [1, 2]
    assert all(p.status == "done" for p in plan(configs, tmp_path))
    assert [row["status"] for row in status_table(tmp_path, tmp_path / "logs")] == ["done"] * 3


def test_debug_executor_runs_in_this_process(tmp_path):
    jobs = submit(make_executor("debug", tmp_path / "logs"), [TINY], tmp_path)
    assert outcomes(jobs, [TINY], tmp_path)[0].record == read_record(record_path(TINY, tmp_path))
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
                         "#SBATCH --time=240", "#SBATCH --cpus-per-task=8", "#SBATCH --signal=USR2@120",
                         "-u -m dpeq_utils.sweep_job "):  # dpeq's checked loader, not submitit's _submit
                assert line in sbatch, (line, sbatch)
            assert len({job.job_id.split("_")[0] for job in jobs}) == 1  # one array job
        for job in jobs:  # what each array task would run on a node, outside the mock
            with mock.job_context(job.job_id):
                process_job(job.paths.folder)
        assert [o.record["seed"] for o in outcomes(jobs, configs, tmp_path)] == [0, 1, 2]
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
    assert outcomes([job], [config], folder, poll_s=0.1)[0].record is not None
    record = read_record(record_path(config, folder))
    assert record["resumed_at_steps"], "the job was not interrupted (it finished first?)"
    assert record["test_accuracy"] == reference["test_accuracy"]
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

    def alive() -> list[tuple[int, str]]:
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(logs) in text:
                found.append((int(cmdline.parent.name), text))
        return found

    try:
        deadline = time.monotonic() + 120
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.exists(), "the job never checkpointed"
        driver.send_signal(how)
        assert driver.wait(timeout=120) != 0
        deadline = time.monotonic() + 10
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alive() == [], "a job of the stopped sweep is still running"
    finally:  # a failing run of this test must not leave its 5,000-step job running (it would slow every later test)
        for pid, _ in alive():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        driver.kill()
    from dpeq_utils.checkpoint import read_checkpoint

    assert 0 < read_checkpoint(path)["state"]["step"] < config.update_steps
    assert status_table(folder)[0]["status"] == "resumable", "no lock left held"


# ---------------------------------------------------------------------------------------------- what the logs folder may hold


def _tiny_profile(tmp_path) -> Path:
    import yaml

    profile = tmp_path / "tiny.yaml"
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.to_dict().items() if k != "profile"}
    profile.write_text(yaml.safe_dump({"description": "tiny", "run": fields}))
    return profile


@pytest.mark.slow
def test_a_result_pickle_swapped_under_a_running_local_sweep_runs_nothing(tmp_path, capsys):
    """Someone who can write the runs folder replaces each job's result pickle the moment it appears
    (as a shared scratch folder allows): the driver takes each outcome from the run's record and the
    job's JSON status and loads no pickle, so nothing runs and all three runs are reported done."""
    import pickle
    import threading

    marker, runs = tmp_path / "payload-ran", tmp_path / "runs"
    swapped: set = set()
    stop = threading.Event()

    def swap():
        while not stop.is_set():
            for path in (runs / "sweep-logs").glob("*/*_result.pkl"):
                if path not in swapped:
                    path.write_bytes(pickle.dumps(("success", CodePayload(marker))))
                    swapped.add(path)
            time.sleep(0.002)
    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        code = main(["--profile", str(_tiny_profile(tmp_path)), "--grid", "seed=[0,1,2]", "--runs-dir", str(runs),
                     "--executor", "local", "--concurrency", "3"])
    finally:
        stop.set()
        swapper.join()
    out = capsys.readouterr().out
    assert len(swapped) == 3, "the swap did not happen while the sweep ran"
    assert not marker.exists(), "the driver unpickled a result file"
    assert code == 0 and "3 runs done, 0 failed" in out, out


def test_a_job_runs_only_a_submission_its_sweep_signed(tmp_path, monkeypatch):
    """The job side: a submitted pickle swapped in by someone else (code, or a well-formed RunJob
    signed without the sweep's key) is refused before anything in it is called, naming the file."""
    import pickle

    from submitit.core.utils import DelayedSubmission

    marker = tmp_path / "payload-ran"
    genuine = tmp_path / "1_submitted.pkl"
    DelayedSubmission(RunJob(TINY.to_dict(), str(tmp_path / "runs"))).dump(genuine)
    assert load_submission(genuine).function.config == TINY.to_dict()
    crafted = {"code": DelayedSubmission(CodePayload(marker)),
               "forged": DelayedSubmission(RunJob(TINY.to_dict(), "/elsewhere", True, signature="0" * 64)),
               "raw code": CodePayload(marker)}
    for name, content in crafted.items():
        path = tmp_path / f"{name}_submitted.pkl"
        path.write_bytes(pickle.dumps(content))
        with pytest.raises(SubmissionRefused, match=re.escape(f"refused to run {path}")):
            load_submission(path)
    monkeypatch.delenv("DPEQ_SWEEP_KEY")
    with pytest.raises(SubmissionRefused, match="no DPEQ_SWEEP_KEY"):
        load_submission(genuine)
    assert not marker.exists()


def test_the_job_command_refuses_a_crafted_submission_and_says_so_in_its_status(tmp_path):
    """What a local job runs (``python -m dpeq_utils.sweep_job <folder>``), on a folder whose submitted
    pickle was swapped: it exits with an error, runs nothing, and its JSON status says why."""
    import json
    import pickle
    import subprocess
    import sys

    marker, folder = tmp_path / "payload-ran", tmp_path / "logs" / "4242"
    folder.mkdir(parents=True)
    (folder / "4242_submitted.pkl").write_bytes(pickle.dumps(CodePayload(marker)))
    env = {**os.environ, "SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_GLOBALID": "0",
           "SUBMITIT_LOCAL_LOCALID": "0", "SUBMITIT_LOCAL_NTASKS": "1", "SUBMITIT_LOCAL_NODEID": "0",
           "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    job = subprocess.run([sys.executable, "-m", "dpeq_utils.sweep_job", str(folder)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert job.returncode != 0 and not marker.exists()
    status = json.loads((folder / "4242_0_status.json").read_text())
    assert status["outcome"] == "failed" and "refused to run" in status["error"]
    rows = {row["run"]: row["status"] for row in status_table(tmp_path, tmp_path / "logs")}
    assert rows["job 4242"].startswith("failed: SubmissionRefused: refused to run") and not marker.exists()


def test_status_survives_a_small_result_file_that_expands_to_gigabytes(tmp_path):
    """A 1 KB result pickle repeating one memo slot (a list of 10 copies of a list of 10 copies ...):
    one row saying it is not a job's result, within a second, nothing expanded."""
    import pickle
    import tracemalloc

    nested: list = ["x"]
    for _ in range(12):
        nested = [nested] * 10
    job = tmp_path / "sweep-logs" / "7"
    job.mkdir(parents=True)
    (job / "7_0_result.pkl").write_bytes(pickle.dumps(("error", nested)))
    assert (job / "7_0_result.pkl").stat().st_size < 1024
    started = time.perf_counter()
    tracemalloc.start()
    try:
        rows = status_table(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 2 and peak < 200 * 2 ** 20
    assert len(rows) == 1 and rows[0]["status"].startswith("unreadable result") and "7_0_result.pkl" in rows[0]["status"]


def test_status_drops_a_failure_of_a_run_that_has_a_record_now(tmp_path):
    """A job refused because another process held the run's lock (RunLocked) failed; once the run has
    its record, the failure is history, not a row."""
    import pickle

    run(TINY, tmp_path, progress=False)
    stem = record_path(TINY, tmp_path).stem
    for job, run_name in (("8", stem), ("9", "resnet9-D4-ffffffffffffffff")):
        folder = tmp_path / "sweep-logs" / job
        folder.mkdir(parents=True)
        (folder / f"{job}_0_result.pkl").write_bytes(pickle.dumps(
            ("error", f"Traceback ...\nRuntimeError: run {run_name} failed: RunLocked: pid 1 is training this run")))
    rows = {row["run"]: row["status"] for row in status_table(tmp_path)}
    assert rows == {stem: "done", "job 9": "failed: RuntimeError: run resnet9-D4-ffffffffffffffff failed: RunLocked: "
                                            "pid 1 is training this run"}
