"""What a sweep's job runs where it runs: ``python -m dpeq_utils.sweep_job <logs folder>``, in place of
submitit's own ``python -m submitit.core._submit``, and the files it leaves for the driver.

submitit hands a job its work as a pickle in the sweep's logs folder (``<job>_submitted.pkl``) and
takes the outcome back as another (``<job>_<task>_result.pkl``); its readers load both with plain
``pickle.load``, which runs whatever a pickle names. A logs folder may be writable by others (a
shared runs folder on a cluster's scratch disk), and the job starts before submitit moves its
pickle into place, so neither side of a dpeq sweep loads a pickle from there as code:

- **the job** reads its submitted pickle with an unpickler that admits two classes, submitit's
  ``DelayedSubmission`` and dpeq's :class:`RunJob`, and no function; it runs the
  run only if the RunJob's ``signature`` checks out: an HMAC of its config, runs folder and
  ``write_reference`` under a key that the sweep driver drew for itself and passed to its jobs in
  their environment (``DPEQ_SWEEP_KEY``), never on disk. A pickle swapped in by someone else is
  refused before it is built, and so is a well-formed RunJob they signed without the key;
- **the driver** (and ``sweep status``) takes each job's outcome from what dpeq writes: the run's
  record, verified (:func:`dpeq_utils.records.read_record`), and the job's plain JSON status
  (``<job>_<task>_status.json``: the run, and for a failure its last error line). submitit's result
  pickle is still written (submitit's own ``done()`` looks for it) and is read by nothing but
  ``sweep status``'s builtins-only, size-bounded reader.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import pickle
import secrets
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import submitit
from submitit.helpers import Checkpointable

if TYPE_CHECKING:
    from .config import RunConfig

#: The environment variable through which the sweep driver hands its jobs the key of their signatures.
KEY_VARIABLE = "DPEQ_SWEEP_KEY"
#: A submitted pickle of a RunJob is about 1 KB; a status file a few hundred bytes.
MAX_SUBMITTED_BYTES = 1 << 20
MAX_STATUS_BYTES = 1 << 16
ADMITTED = {("submitit.core.utils", "DelayedSubmission"), ("dpeq_utils.sweep_job", "RunJob")}


class SubmissionRefused(Exception):
    """A submitted pickle that is not one this sweep's driver wrote."""


def sweep_key() -> str:
    """The key this driver signs its jobs with (drawn once per process, inherited by its jobs)."""
    if not os.environ.get(KEY_VARIABLE):
        os.environ[KEY_VARIABLE] = secrets.token_hex(32)
    return os.environ[KEY_VARIABLE]


def signature_of(config: dict, runs_dir: str, write_reference: bool, key: str | None = None) -> str:
    """HMAC-SHA256 of what a RunJob runs, under the sweep's key."""
    message = json.dumps({"config": config, "runs_dir": runs_dir, "write_reference": write_reference}, sort_keys=True)
    return hmac.new((key or sweep_key()).encode(), message.encode(), hashlib.sha256).hexdigest()


class RunJob(Checkpointable):
    """One run as a submitit job: train it (or resume it) and write its record. Checkpointable: on
    preemption or timeout submitit requeues the same job, which resumes from the run's checkpoint
    (the trainer wrote it before handing the signal on). ``signature``: what the job checks before it
    runs (:mod:`dpeq_utils.sweep_job`), made here with this process's sweep key (:func:`signature_of`)."""

    def __init__(self, config: dict, runs_dir: str, write_reference: bool = False, signature: str | None = None):
        self.config, self.runs_dir, self.write_reference = config, runs_dir, write_reference
        self.signature = signature if signature is not None else signature_of(config, runs_dir, write_reference)

    def __call__(self) -> dict:
        from .config import RunConfig
        from .records import record_path
        from .runs import load_or_run

        config = RunConfig(**self.config)
        if os.environ.get("SUBMITIT_EXECUTOR") == "local":
            # submitit's jobs ignore ("bypass") SIGTERM, as Slurm preemption needs; a local job asked to stop
            # (the sweep driver stopping) stops at the end of its step, after writing its checkpoint
            signal.signal(signal.SIGTERM, _stop_job)
        try:
            record = load_or_run(config, self.runs_dir, progress=False,
                                 write_reference=getattr(self, "write_reference", False))
        except Exception as err:  # the job's last error line (what `status` shows) names the run
            message = str(err).splitlines()[0] if str(err) else ""
            raise RuntimeError(f"run {record_path(config, self.runs_dir).stem} failed: {type(err).__name__}: "
                               f"{message}") from err
        return {"record": str(record_path(config, self.runs_dir)), "test_accuracy": record["test_accuracy"],
                "epsilon_spent": record["epsilon_spent"], "wall_time_s": record["wall_time_s"]}


def _stop_job(signum, frame):
    raise SystemExit(128 + signum)


class _SubmissionUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ADMITTED:
            raise SubmissionRefused(f"it names {module[:60]}.{name[:60]}, which a dpeq sweep never submits")
        return super().find_class(module, name)


def load_submission(path: Path):
    """The DelayedSubmission in ``path``, checked: a RunJob signed with this job's key, called with no
    arguments. Raises :class:`SubmissionRefused` (naming the file) for anything else."""
    from submitit.core.utils import DelayedSubmission

    path = Path(path)
    try:
        if path.stat().st_size > MAX_SUBMITTED_BYTES:
            raise SubmissionRefused(f"it is {path.stat().st_size} bytes, a dpeq job is about a kilobyte")
        delayed = _SubmissionUnpickler(io.BytesIO(path.read_bytes())).load()
        if type(delayed) is not DelayedSubmission or delayed.args != () or delayed.kwargs != {}:
            raise SubmissionRefused("it is not a dpeq RunJob called with no arguments")
        job = delayed.function
        if type(job) is not RunJob or set(vars(job)) != {"config", "runs_dir", "write_reference", "signature"}:
            raise SubmissionRefused("it is not a dpeq RunJob")
        if not (isinstance(job.config, dict) and isinstance(job.runs_dir, str) and type(job.write_reference) is bool
                and isinstance(job.signature, str)):
            raise SubmissionRefused("its RunJob's fields have the wrong types")
        key = os.environ.get(KEY_VARIABLE)
        if not key:
            raise SubmissionRefused(f"this job's environment has no {KEY_VARIABLE} (the sweep driver passes it; on "
                                    "Slurm through sbatch's default --export=ALL)")
        expected = signature_of(job.config, job.runs_dir, job.write_reference, key)
        if not hmac.compare_digest(expected, job.signature):
            raise SubmissionRefused("its RunJob is not signed by the sweep that started this job")
    except SubmissionRefused as err:
        raise SubmissionRefused(f"refused to run {path}: {err}; a dpeq sweep did not write it (is the logs folder "
                                "writable by others?)") from None
    except Exception as err:  # truncated, foreign or crafted pickles raise many different errors
        raise SubmissionRefused(f"refused to run {path}: not a submission of a dpeq sweep ({type(err).__name__}: "
                                f"{str(err)[:200]})") from None
    return delayed


def status_path(result_pickle: Path) -> Path:
    """The JSON status beside submitit's ``<job>_<task>_result.pkl``."""
    return Path(result_pickle).with_name(Path(result_pickle).name.replace("_result.pkl", "_status.json"))


def write_status(path: Path, outcome: str, run: str | None, error: str | None = None) -> None:
    from .paths import write_atomic

    content = {"outcome": outcome, "run": run, "error": error}
    write_atomic(path, lambda handle: handle.write(json.dumps(content) + "\n"))


def read_status(path: Path) -> dict | None:
    """A job's status, or None if it wrote none; a file that is not one is reported as a failure."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_STATUS_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes")
        content = json.loads(path.read_text())
        if not (isinstance(content, dict) and content.get("outcome") in ("done", "failed")
                and all(content.get(k) is None or isinstance(content.get(k), str) for k in ("run", "error"))):
            raise ValueError("not a dpeq job status")
    except (ValueError, OSError, RecursionError) as err:
        return {"outcome": "failed", "run": None, "error": f"unreadable status {path} ({str(err)[:100]})"}
    return {"outcome": content["outcome"], "run": content.get("run"), "error": (content.get("error") or "")[:500]}


def process_job(folder: str | os.PathLike) -> None:
    """submitit's ``process_job``, loading the submission with :func:`load_submission` and writing the
    job's JSON status beside submitit's result pickle."""
    from submitit.core import job_environment, utils
    from submitit.core.logger import get_logger

    os.environ["SUBMITIT_FOLDER"] = str(folder)
    environment = job_environment.JobEnvironment()
    paths = environment.paths
    logger = get_logger()
    for _ in range(60):  # the driver moves the pickle into place after starting the job
        if paths.submitted_pickle.exists():
            break
        time.sleep(1)
    run = None
    try:
        delayed = load_submission(paths.submitted_pickle)
        run = _run_name(delayed.function)
        environment._handle_signals(paths, delayed)  # preemption: checkpoint and requeue, as submitit does
        # DelayedSubmission.result() calls its function, the RunJob load_submission checked; unlike submitit's
        # Job.result() it reads no result file (the driver reads each job's JSON status, never a pickle)
        result = delayed.result()
        write_status(status_path(paths.result_pickle), "done", run)
        with utils.temporary_save_path(paths.result_pickle) as temporary:
            utils.cloudpickle_dump(("success", result), temporary)
    except Exception as error:
        lines = str(error).strip().splitlines()
        write_status(status_path(paths.result_pickle), "failed", run,
                     f"{type(error).__name__}: {lines[0] if lines else ''}"[:500])
        with utils.temporary_save_path(paths.result_pickle) as temporary:
            utils.cloudpickle_dump(("error", traceback.format_exc()), temporary)
        logger.error("the job failed")
        raise


def _run_name(job) -> str | None:
    from .config import RunConfig
    from .records import record_path

    try:
        return record_path(RunConfig(**job.config), job.runs_dir).stem
    except Exception:  # noqa: BLE001 - the run itself reports a bad config
        return None


# ---------------------------------------------------------------------------------------------- the driver's side


@dataclass
class Outcome:
    """What became of one submitted run: its record (verified) or one line saying why there is none."""

    config: "RunConfig"
    job_id: str
    record: dict | None
    error: str | None


def outcomes(jobs: list, configs: list, runs_dir, poll_s: float = 10.0) -> list[Outcome]:
    """Wait for ``jobs`` (as :func:`submit` returned them for ``configs``) and say what became of each,
    from what dpeq wrote: the run's record, verified, and the job's JSON status
    (:mod:`dpeq_utils.sweep_job`). submitit's result pickles are never loaded: a logs folder others
    can write to cannot run code here. Debug jobs run now, in this process."""
    from .records import read_record, record_path

    errors: dict[int, str] = {}
    for index, job in enumerate(jobs):
        if isinstance(job, submitit.DebugJob):
            error = job.exception()  # runs it here; nothing is read from disk
            if error is not None:
                lines = str(error).strip().splitlines()
                errors[index] = f"{type(error).__name__}: {lines[0] if lines else ''}"
    while not all(job.done() for job in jobs):  # the process or the Slurm task ended (result pickle unread)
        time.sleep(poll_s)
    found = []
    for index, (job, config) in enumerate(zip(jobs, configs, strict=True)):
        path = record_path(config, runs_dir)
        if path.is_file():
            try:
                found.append(Outcome(config, job.job_id, read_record(path), None))
            except Exception as err:  # noqa: BLE001 - one bad record must not hide the other runs
                found.append(Outcome(config, job.job_id, None, f"its record is not valid: {str(err).splitlines()[0]}"))
            continue
        status = None if isinstance(job, submitit.DebugJob) else read_status(status_path(job.paths.result_pickle))
        if index in errors:
            error = errors[index]
        elif status is not None and status["outcome"] == "failed":
            error = status["error"] or "failed"
        elif status is not None:
            error = f"the job reported done, but there is no record at {path}"
        else:
            error = f"the job ended without a status or a record ({job.state.lower()}); its log: {job.paths.stderr}"
        found.append(Outcome(config, job.job_id, None, error))
    return found


class _PlainUnpickler(pickle.Unpickler):
    """Builtin values only (submitit's ``(outcome, detail)`` of a failed job is a tuple of strings):
    a result file that names any class or function is refused, never loaded."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"names {module[:60]}.{name[:60]}")


#: A result pickle of a failed job holds its traceback: kilobytes. Larger files are not read.
MAX_RESULT_BYTES = 1 << 20


def _failed_job_line(result: Path) -> str | None:
    """The last line of a failed job's traceback from submitit's result pickle (None: the job
    succeeded), read as plain values, bounded: a file larger than :data:`MAX_RESULT_BYTES`, naming any
    class or function, or holding anything but ``(str, str)`` for a failure is refused (ValueError)
    before anything in it is expanded or printed."""
    size = result.stat().st_size
    if size > MAX_RESULT_BYTES:
        raise ValueError(f"{size} bytes, a result of a dpeq job is a few kilobytes")
    value = _PlainUnpickler(io.BytesIO(result.read_bytes())).load()
    if not (isinstance(value, tuple) and len(value) == 2 and value[0] in ("success", "error")):
        raise ValueError("not submitit's (outcome, detail)")
    if value[0] == "success":
        return None
    if not isinstance(value[1], str):
        raise ValueError("a failure whose detail is not text")
    lines = value[1].strip().splitlines()
    return lines[-1][:500] if lines else "error"


def _job_files(logs: Path) -> list[tuple[str, dict | None, Path]]:
    """Each finished job in a logs folder: its id, its dpeq status (None if it wrote none) and its
    submitit result pickle."""
    if not logs.is_dir():
        return []
    return [(result.parent.name, read_status(status_path(result)), result) for result in sorted(logs.glob("*/*_result.pkl"))]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m dpeq_utils.sweep_job <submitit folder>")
    from dpeq_utils.sweep_job import process_job as run_in_module  # the RunJob class the pickle names, not __main__'s

    run_in_module(sys.argv[1])
