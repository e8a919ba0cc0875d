"""Running: train a config that has no record yet and write its record (:func:`run`,
:func:`load_or_run`), one process per run at a time (:func:`run_lock`). Records themselves — keys,
reading, verifying, finding, tables — are :mod:`dpeq_utils.records`. Its command line trains one
run: ``python -m dpeq_utils train``; grids of runs are
:mod:`dpeq_utils.sweep` and :mod:`dpeq_utils.study`, which decide *which* runs, never *how*.
"""

from __future__ import annotations

import contextlib
import os
import sys
from argparse import BooleanOptionalAction
from datetime import datetime, timezone
from pathlib import Path

from .config import RunConfig
from .errors import DpeqError
from .provenance import CODE
from .records import SCHEMA, config_key, find_record, read_record, record_path, write_record
from .runtime import device_name, git_commit, library_versions, pick_device
from .shipped import guard_write


class RunLocked(DpeqError, RuntimeError):
    """Another process is training the same config into the same folder."""


@contextlib.contextmanager
def run_lock(path: Path):
    """An exclusive lock on one record's run: ``<record>.lock`` beside it, held with ``flock`` so the
    operating system releases it when its process ends, however it ends (no stale locks on a local
    disk). A second process asking for it is refused at once, told who holds it."""
    import fcntl
    import socket

    lock = path.with_name(path.name + ".lock")
    handle = open(lock, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunLocked(f"{holder} is training this run already (lock {lock}); wait for it to finish (its record "
                        f"will then be read) or stop it") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}")
        handle.flush()
        yield
    finally:
        lock.unlink(missing_ok=True)
        handle.close()


def run(config: RunConfig, runs_dir: str | os.PathLike | None = None, progress: bool = True, data=None,
        force_memory: bool = False, resume: bool = True, resume_other_code: bool = False,
        write_reference: bool = False) -> dict:
    """Train ``config`` and write its record; returns the record. The record's folder is checked
    (writable, room on disk) and the run locked (:func:`run_lock`) before anything is trained. The
    run resumes from its checkpoint if one is there (``resume=False``: starts over; a checkpoint
    written by other package code only with ``resume_other_code``) and writes checkpoints as it goes
    (:mod:`dpeq_utils.checkpoint`). A folder of shipped records is written only with
    ``write_reference`` (:mod:`dpeq_utils.shipped`)."""
    from .checkpoint import Checkpoints, checkpoint_path
    from .preflight import check_output_folder

    path = record_path(config, runs_dir)
    guard_write(path.parent, write_reference)
    check_output_folder(path.parent)
    with run_lock(path):
        checkpoints = Checkpoints(checkpoint_path(path), config_key(config), resume=resume,
                                  every=config.checkpoint_every, other_code=resume_other_code)
        record = _train_and_write(config, path, progress, data, force_memory, checkpoints)
        checkpoints.remove()
        return record


def _train_and_write(config: RunConfig, path: Path, progress: bool, data, force_memory: bool, checkpoints) -> dict:
    from .train import train

    results = train(config, progress=progress, data=data, force_memory=force_memory, checkpoints=checkpoints)
    record = {
        "schema": SCHEMA,
        "key": config_key(config),
        "config": config.to_dict(),
        **results,
        "device": device_name(pick_device(config.device)),
        "versions": library_versions(),
        "git_commit": git_commit(),
        "source_sha256": CODE["source_sha256"],
        "seed": config.seed,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return write_record(path, record)


def load_or_run(config: RunConfig, runs_dir: str | os.PathLike | None = None, force: bool = False,
                progress: bool = True, data=None, force_memory: bool = False, resume: bool = True,
                resume_other_code: bool = False, write_reference: bool = False) -> dict:
    """The record of ``config``: found by :func:`find_record` (unless ``force``), else trained and
    written to ``runs_dir``, resuming from the run's checkpoint if there is one (unless ``force`` or
    ``resume=False``, which start over). A record read from disk carries ``"source"``: the file it
    came from. ``resume_other_code``, ``write_reference``: see :func:`run`."""
    path = None if force else find_record(config, runs_dir)
    if path is not None:
        return {**read_record(path), "source": str(path)}
    return run(config, runs_dir, progress, data, force_memory, resume=resume and not force,
               resume_other_code=resume_other_code, write_reference=write_reference)


def main(argv: list[str] | None = None) -> int:
    """Train one run of a profile and write its record (``python -m dpeq_utils train``)."""
    from .cli import base_config, command_parser, user_errors
    from .models import model_tag

    parser = command_parser("train", "Train one run of a profile and write its record. The last line printed is "
                            "the record's path.", profile="smoke", config=True, records=True)
    parser.add_argument("--force", action="store_true",
                        help="train from step 0 even if a record or a checkpoint of this config exists")
    parser.add_argument("--resume", action=BooleanOptionalAction, default=True,
                        help="continue from this run's checkpoint if there is one (default); --no-resume starts over")
    parser.add_argument("--force-memory", action="store_true",
                        help="train even if the run's estimated memory exceeds what is available")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    config = base_config(parser, args)
    prog = parser.prog
    with user_errors(prog, args.debug):
        found = None if args.force else find_record(config, args.runs_dir)
        record = load_or_run(config, runs_dir=args.runs_dir, force=args.force, progress=not args.no_progress,
                             force_memory=args.force_memory, resume=args.resume,
                             resume_other_code=args.resume_other_code, write_reference=args.write_reference)
    eps = record["epsilon_spent"]
    origin = (f"read from {found} (trained {record.get('created', '?')} on {record['device']}, "
              f"{record['wall_time_s']:.0f} s then)" if found else f"{record['wall_time_s']:.1f} s on {record['device']}")
    print(f"{model_tag(config.model, config.group)} on {config.dataset}: "
          f"test accuracy {record['test_accuracy']:.3f} (EMA {record['test_accuracy_ema']:.3f}), "
          f"ε = {'∞ (non-private)' if eps is None else f'{eps:.3f} ≤ {config.target_epsilon}'}, "
          f"σ = {record['noise_multiplier']:.4g}, q = {record['sample_rate']:.4g}, {record['steps']} steps, "
          f"{record['num_params']} parameters; {origin}")
    print(found or record_path(config, args.runs_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
