"""Sweeps: a grid of runs handed to an executor — Slurm through submitit on a cluster, or this
machine — with the same code, records and checkpoints as a single run.

    python -m dpeq_utils sweep --profile paper --grid "target_epsilon=[1,2,3,5,8]" \\
        --grid "seed=[0,1,2]" --grid "model=[eq_resnet9,resnet9_matched,wrn16_4]" \\
        --executor slurm --partition gpu --gpus-per-run 1 --time 240 --array-parallelism 8
    python -m dpeq_utils sweep status data/runs/paper

Only runs without a record are submitted (a run with a checkpoint resumes from it). On Slurm the
runs are one array job, one task per run; each task is a checkpointable callable
(:class:`RunJob`): when Slurm preempts it or its time limit nears, Slurm sends SIGUSR2 (submitit
asks for it ``signal_delay_s`` before the limit), the trainer writes the run's checkpoint at the end
of the current step (:mod:`dpeq_utils.checkpoint`), and submitit requeues the task, which resumes.
``--executor local`` runs the same jobs as processes on this machine, at most ``--concurrency`` at
a time (submitit's local executor has no limit of its own); ``--executor debug`` runs them in this
process. ``--dry-run`` prints the plan and an estimate of the device hours it needs.

What a job runs where it runs, and how the driver learns what became of it without loading a pickle
from the logs folder as code, is :mod:`dpeq_utils.sweep_job`.

Why one file of ~390 lines: planning, the executors, stopping jobs cleanly through their
checkpoints and reading a runs folder's status are one lifecycle; records and training are
:mod:`dpeq_utils.records` and :mod:`dpeq_utils.runs`.
"""

from __future__ import annotations

import itertools
import re
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import submitit

from .config import RunConfig, cost_key, parse_assignment
from .sweep_job import RunJob, _failed_job_line, _job_files, outcomes  # noqa: F401 - RunJob, outcomes: part of this API

EXECUTORS = ("slurm", "local", "debug")


def expand_grid(base: RunConfig, grids: list[str]) -> list[RunConfig]:
    """Every combination of the ``"field=[v1, v2, ...]"`` lists, applied to ``base`` (grid order,
    last field fastest).

    >>> [(c.seed, c.target_epsilon) for c in expand_grid(RunConfig(), ["seed=[0,1]", "target_epsilon=[1,8]"])]
    [(0, 1.0), (0, 8.0), (1, 1.0), (1, 8.0)]
    """
    fields, values = [], []
    for text in grids:
        name, value = parse_assignment(text)
        if not isinstance(value, list) or not value:
            raise ValueError(f"--grid {text!r}: give a non-empty list, e.g. {name}=[1, 2]")
        if name in fields:
            raise ValueError(f"--grid names {name} twice; put all its values in one list")
        fields.append(name)
        values.append(value)
    return [base.replace(**dict(zip(fields, combination))) for combination in itertools.product(*values)]


@dataclass
class PlannedRun:
    config: RunConfig
    status: str  # "done" (a record exists), "resumable" (a checkpoint exists), "missing"


def plan(configs: list[RunConfig], runs_dir) -> list[PlannedRun]:
    from .checkpoint import checkpoint_path
    from .records import find_record, record_path

    planned = []
    for config in configs:
        if find_record(config, runs_dir) is not None:
            status = "done"
        elif checkpoint_path(record_path(config, runs_dir)).exists():
            status = "resumable"
        else:
            status = "missing"
        planned.append(PlannedRun(config, status))
    return planned


def _job_command(executor) -> str:
    """The command a job runs: dpeq's loader (:mod:`dpeq_utils.sweep_job`), not submitit's ``_submit``."""
    return " ".join([executor.python, "-u -m dpeq_utils.sweep_job", shlex.quote(str(executor.folder))])


class LocalExecutor(submitit.LocalExecutor):
    """submitit's local executor whose jobs load their submission with dpeq's checked loader."""

    _submitit_command_str = property(_job_command)  # type: ignore[assignment]


class SlurmExecutor(submitit.SlurmExecutor):
    """submitit's Slurm executor whose jobs load their submission with dpeq's checked loader."""

    _submitit_command_str = property(_job_command)  # type: ignore[assignment]


def make_executor(kind: str, logs_dir: Path, *, partition: str | None = None, gpus_per_run: int = 0,
                  time_min: int = 240, array_parallelism: int = 16, cpus_per_run: int | None = None,
                  slurm_options: dict | None = None):
    """A submitit executor for ``kind`` (one of :data:`EXECUTORS`), its logs in ``logs_dir`` (``%j``: job id)."""
    if kind not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {kind!r}")
    folder = Path(logs_dir) / "%j"
    if kind == "debug":
        return submitit.DebugExecutor(folder=folder)
    if kind == "local":
        executor = LocalExecutor(folder=folder)
        # the local default time limit is 2 minutes; and without gpus_per_node a job sees no GPU
        executor.update_parameters(timeout_min=time_min, gpus_per_node=gpus_per_run)
        return executor
    slurm = SlurmExecutor(folder=folder, max_num_timeout=20)
    parameters: dict = {"time": time_min, "gpus_per_node": gpus_per_run, "ntasks_per_node": 1, "nodes": 1,
                  "array_parallelism": array_parallelism, "signal_delay_s": 120, "job_name": "dpeq"}
    if partition:
        parameters["partition"] = partition
    if cpus_per_run:
        parameters["cpus_per_task"] = cpus_per_run
    slurm.update_parameters(**parameters, **(slurm_options or {}))
    return slurm


def submit(executor, configs: list[RunConfig], runs_dir, concurrency: int = 1, echo=print,
           write_reference: bool = False) -> list:
    """Submit one job per config; returns the jobs, in the order of ``configs``. A Slurm executor gets
    one array job. A local executor runs at most ``concurrency`` jobs at a time (this call then waits
    for them all). What became of each: :func:`outcomes`."""
    jobs = [RunJob(c.to_dict(), str(runs_dir), write_reference) for c in configs]
    if isinstance(executor, submitit.LocalExecutor):
        return _submit_throttled(executor, jobs, max(1, concurrency), echo)
    if isinstance(executor, submitit.DebugExecutor):
        return [executor.submit(job) for job in jobs]
    with executor.batch():
        submitted = [executor.submit(job) for job in jobs]
    return submitted


#: Seconds a stopping sweep waits for its local jobs to checkpoint and exit before it kills them.
STOP_GRACE_S = 600.0


def _submit_throttled(executor, jobs: list[RunJob], concurrency: int, echo, grace_s: float | None = None) -> list:
    """Run local jobs ``concurrency`` at a time. Ctrl-C or SIGTERM to this driver stops them all
    through their checkpoints (each ends its current step, saves, exits; the next sweep resumes them)
    and leaves no job running; then the interrupt goes on."""
    waiting: list[RunJob] = list(jobs)
    running: list = []  # submitit jobs
    submitted: list = []
    previous = signal.signal(signal.SIGTERM, _driver_terminated) if _main_thread() else None
    try:
        while waiting or running:
            while waiting and len(running) < concurrency:
                running.append(executor.submit(waiting.pop(0)))
                submitted.append(running[-1])
            time.sleep(0.5)
            for job in [j for j in running if j.done()]:  # the process ended: nothing is read from the job's files
                running.remove(job)
                echo(f"  job {job.job_id}: {job.state.lower()}")
    except KeyboardInterrupt:
        _stop_local_jobs(running, echo, STOP_GRACE_S if grace_s is None else grace_s)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return submitted


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _driver_terminated(signum, frame):
    raise KeyboardInterrupt  # SIGTERM to the driver stops its jobs the way Ctrl-C does


def _stop_local_jobs(running: list, echo, grace_s: float) -> None:
    """SIGTERM to each job's controller (which forwards it to the job), wait for them to checkpoint
    and exit, and kill what is still alive after ``grace_s``."""
    for job in running:
        process = getattr(job, "_process", None)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
    echo(f"  stopping {len(running)} running job(s) at the end of their steps (checkpointed; rerun to resume)")
    deadline = time.monotonic() + grace_s
    for job in running:
        process = getattr(job, "_process", None)
        if process is None:
            continue
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - still alive after the grace period
            process.kill()
            process.wait()


def step_kind(config: RunConfig) -> tuple:
    """What sets the throughput (examples·views per second) of a run's steps on one device: its
    :func:`~dpeq_utils.config.cost_key` without what a count of examples·views already scales by, and
    without the device (a record's own)."""
    return cost_key(config.to_dict(), leave_out=("dataset", "batch_size", "aug_mult", "device"))


def estimate_hours(configs: list[RunConfig], throughput: float | None, records: list[dict]) -> tuple[float | None, str]:
    """Device hours for ``configs``: their examples × views divided by a throughput (examples·views
    per second), given, or measured by existing records of the same kind of step (:func:`step_kind`)
    on any device."""
    from .models import MODEL_REGISTRY

    work: dict[tuple, int] = {}
    names: dict[tuple, str] = {}
    for config in configs:
        steps = config.update_steps if config.update_steps is not None else None
        if steps is None:
            return None, "runs sized by epochs: pass --throughput and count steps yourself"
        kind = step_kind(config)
        work[kind] = work.get(kind, 0) + steps * config.batch_size * config.aug_mult
        names[kind] = (f"{config.model}{' ' + config.group if MODEL_REGISTRY[config.model].takes_group else ''}"
                       + (" (non-private)" if config.non_private else ""))
    if throughput:
        return sum(work.values()) / throughput / 3600, f"at the given {throughput:g} examples·views/s"
    rates: dict[tuple, list[tuple[float, str]]] = {}
    for record in records:
        views = record["steps"] * record["mean_batch_size"] * record["config"]["aug_mult"]
        if record.get("train_time_s"):
            rates.setdefault(step_kind(RunConfig(**record["config"])), []).append(
                (views / record["train_time_s"], record["device"]))
    missing = sorted({names[k] for k in work if k not in rates})
    if missing:
        return None, (f"no record measures a run like {', '.join(missing)} yet: pass --throughput "
                      "(examples·views per second)")
    hours = sum(work[m] / max(r for r, _ in rates[m]) for m in work) / 3600
    devices = sorted({d for m in work for _, d in rates[m]})
    return hours, f"at the fastest throughput records measured ({'; '.join(devices)})"


def _lock_state(lock: Path) -> str:
    """"running" if a live process holds ``lock`` (tested by trying it: flock is released by the OS
    when its holder dies, however it dies), else "stale"."""
    import fcntl

    try:
        with open(lock, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
    except BlockingIOError:
        return "running"
    except OSError:
        return "running"  # cannot tell: say the cautious thing
    return "stale"


def status_table(runs_dir, logs_dir=None) -> list[dict]:
    """Records, checkpoints, runs in progress (locked) and failed jobs found in a runs folder. A file
    that cannot be read is one row saying so; nothing read here is unpickled as code."""
    from .checkpoint import read_checkpoint
    from .records import read_record

    runs_dir = Path(runs_dir)
    rows = []
    for path in sorted(runs_dir.glob("*.json")):
        try:
            record = read_record(path)
        except Exception as err:  # noqa: BLE001 - a status view reports whatever is wrong, it never stops
            rows.append({"run": path.stem, "status": f"bad record ({str(err).splitlines()[0]})"})
            continue
        rows.append({"run": path.stem, "status": "done", "step": record["steps"], "steps": record["steps"],
                     "test_accuracy": record["test_accuracy"], "epsilon": record["epsilon_spent"]})
    locks = {path.name[: -len(".json.lock")]: _lock_state(path) for path in sorted(runs_dir.glob("*.json.lock"))}
    stale = "stale lock: its process is gone, safe to delete (the next run of it removes it)"
    for path in sorted(runs_dir.glob("*.ckpt")):
        try:
            step = read_checkpoint(path)["state"]["step"]
        except Exception as err:  # noqa: BLE001
            rows.append({"run": path.stem, "status": f"bad checkpoint ({str(err).splitlines()[0]})"})
            continue
        lock = locks.pop(path.stem, None)
        status = {"running": "running", "stale": f"resumable; {stale}"}.get(lock or "", "resumable")
        rows.append({"run": path.stem, "status": status, "step": step})
    for stem, lock in locks.items():
        rows.append({"run": stem, "status": "running (no checkpoint yet)" if lock == "running" else stale})
    logs = Path(logs_dir) if logs_dir is not None else runs_dir / "sweep-logs"
    done = {row["run"] for row in rows if row["status"] == "done"}
    for job, job_status, result in _job_files(logs):
        if job_status is not None:  # what dpeq's job wrote: plain JSON
            if job_status["outcome"] == "done":
                continue
            run, last = job_status["run"], job_status["error"] or "failed"
        else:  # a job that ended before dpeq's loader wrote a status: submitit's result pickle, as plain values
            try:
                last = _failed_job_line(result)
            except Exception as err:  # noqa: BLE001 - a status view reports whatever is wrong, it never stops
                rows.append({"run": f"job {job}", "status": f"unreadable result {result} "
                             f"(refused: {str(err).splitlines()[0][:200] if str(err) else type(err).__name__})"})
                continue
            if last is None:
                continue
            named = re.search(r"run (\S+) failed: ", last)
            run = named.group(1) if named else None
        if run is not None and run in done:
            continue  # failed once (e.g. locked by a concurrent run), done since: the record is what counts
        rows.append({"run": f"job {job}", "status": f"failed: {last}", "log": str(result.parent)})
    return rows


def main(argv: list[str] | None = None) -> int:
    from .cli import base_config, command_parser, user_errors

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["status"]:
        parser = command_parser("sweep status", "Records, checkpoints and failed jobs of a runs folder.")
        parser.add_argument("runs_dir")
        parser.add_argument("--logs-dir", default=None, help="submitit logs (default: RUNS_DIR/sweep-logs)")
        args = parser.parse_args(argv[1:])
        with user_errors(parser.prog, args.debug):
            rows = status_table(args.runs_dir, args.logs_dir)
        import pandas as pd

        table = pd.DataFrame(rows)
        print(table.to_string(index=False) if len(table) else f"nothing in {args.runs_dir}")
        if len(table):
            print("\n" + ", ".join(f"{n} {s}" for s, n in table["status"].value_counts().items()))
        return 0

    parser = command_parser("sweep", __doc__.split("\n\n")[0], profile="smoke", config=True)
    prog = parser.prog
    parser.add_argument("--grid", action="append", default=[], metavar="FIELD=[V1,V2]", help="repeatable")
    parser.add_argument("--logs-dir", default=None, help="submitit logs (default: RUNS_DIR/sweep-logs)")
    parser.add_argument("--executor", choices=EXECUTORS, default="local")
    parser.add_argument("--concurrency", type=int, default=1, help="local executor: runs at a time")
    parser.add_argument("--partition", default=None, help="Slurm partition")
    parser.add_argument("--gpus-per-run", type=int, default=0)
    parser.add_argument("--cpus-per-run", type=int, default=None)
    parser.add_argument("--time", type=int, default=240, help="minutes per job (Slurm: its time limit)")
    parser.add_argument("--array-parallelism", type=int, default=16, help="Slurm: array tasks running at once")
    parser.add_argument("--throughput", type=float, default=None,
                        help="examples·views per second per run, for --dry-run's estimate")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the estimate; submit nothing")
    args = parser.parse_args(argv)
    base = base_config(parser, args)
    try:
        configs = expand_grid(base, args.grid)
    except ValueError as err:
        parser.error(str(err))
    from .paths import runs_dir as default_runs_dir
    from .records import find_records, record_path
    from .shipped import guard_write

    runs_dir = Path(args.runs_dir) if args.runs_dir else default_runs_dir(base.profile)
    with user_errors(prog, args.debug):
        guard_write(runs_dir, write_reference=False)  # sweeps write to a user's folder (the study can extend the shipped one)
    logs_dir = Path(args.logs_dir) if args.logs_dir else runs_dir / "sweep-logs"
    with user_errors(prog, args.debug):
        planned = plan(configs, runs_dir)
        counts = {s: sum(p.status == s for p in planned) for s in ("done", "resumable", "missing")}
        for item in planned:
            print(f"  {item.status:9s}  {record_path(item.config, runs_dir).name}")
        todo = [p.config for p in planned if p.status != "done"]
        print(f"{len(planned)} runs: {counts['done']} done (skipped), {counts['resumable']} resumable, "
              f"{counts['missing']} missing; {len(todo)} to submit to {args.executor}")
        hours, basis = estimate_hours(todo, args.throughput, find_records(base.profile, runs_dir))
        print(f"estimate: {'unknown' if hours is None else f'{hours:.2g} device hours'} ({basis})")
        if args.dry_run or not todo:
            return 0
        executor = make_executor(args.executor, logs_dir, partition=args.partition, gpus_per_run=args.gpus_per_run,
                                 time_min=args.time, array_parallelism=args.array_parallelism,
                                 cpus_per_run=args.cpus_per_run)
        jobs = submit(executor, todo, runs_dir, concurrency=args.concurrency)
        if args.executor == "slurm":
            print(f"submitted array job {jobs[0].job_id.split('_')[0]} ({len(jobs)} tasks); logs in {logs_dir}; "
                  f"follow with: {prog} status {runs_dir}")
            return 0
        failed = 0
        for outcome in outcomes(jobs, todo, runs_dir):
            name = record_path(outcome.config, runs_dir).name
            if outcome.record is not None:
                print(f"  done  {name}: test accuracy {outcome.record['test_accuracy']:.3f}")
            else:
                failed += 1
                print(f"  failed  job {outcome.job_id} ({name}): {outcome.error}")
        print(f"{len(jobs) - failed} runs done, {failed} failed")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
