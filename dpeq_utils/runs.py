"""Run records: config → key → one JSON file per run; ``load_or_run``; a pandas results table.

A record is written atomically (a temporary file in the same folder, then a rename), so a crash
never leaves a half-written record that a later ``load_or_run`` would trust. Its name is
``<model>-<group>-<key>.json``, where the key hashes every config field that can change the result.
Left out: ``profile`` (a label), and ``device``, ``physical_batch_size`` and ``per_sample_engine``,
which change where and how fast a run computes and its float32 rounding, never a random draw: the
Poisson batches and the augmentation views come from CPU generators drawn per logical step. Two
exceptions are stated, not hidden: convolutions give a chunk's examples results that differ in the
last float32 bit from the same examples in a larger chunk, and chunk sums are added in another
order, so a run with another ``physical_batch_size`` agrees to rounding (training is chaotic: over
many steps that is a statistically equivalent run, not the same bits);
and the noise (and the variants' masks) are drawn by the device's own generator, so a CUDA run
draws other noise than a CPU run of the same config. The record's ``config`` and ``device`` say
what produced it.

Record fields (top level): ``key``, ``config``, ``noise_multiplier``, ``sample_rate``, ``steps``,
``epsilon_spent`` (null for a non-private run), ``test_accuracy``, ``test_accuracy_ema``,
``test_loss``, ``num_params``, ``wall_time_s``, ``device``, ``versions``, ``git_commit`` and
``source_sha256`` (the code that ran, read when the package was imported: :mod:`dpeq_utils.provenance`;
records before 2026-12-05 name the checkout at write time and carry no hash), ``seed``,
``dataset_size``, ``test_size``, ``mean_batch_size``, ``epochs``, ``train_time_s``, ``history``
(one entry per evaluation), ``data`` (where the data came from, how it was verified, SHA-256 of the
training and test splits used), ``val_*`` (with a validation split), ``created``, ``schema``,
``digest`` (:func:`record_digest`), ``resumed_at_steps`` (only for a run continued from a
checkpoint), ``code_history`` (only for a run whose checkpoint the user let continue under other
code: every code version it was trained with, from which step). Values that are not finite (the
losses of a diverged run) are stored as null.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from .config import RunConfig
from .models import model_tag
from .paths import reference_dir, write_atomic
from .paths import runs_dir as default_runs_dir
from .provenance import CODE
from .runtime import device_name, git_commit, library_versions, pick_device
from .shipped import guard_write, record_written, verify_shipped

if TYPE_CHECKING:
    import pandas as pd

SCHEMA = 1
#: Fields that do not change what a run computes, only where or how fast.
NOT_IN_KEY = ("profile", "device", "physical_batch_size", "per_sample_engine", "checkpoint_every")
REQUIRED_FIELDS = ("key", "config", "noise_multiplier", "sample_rate", "steps", "epsilon_spent", "test_accuracy",
                   "test_accuracy_ema", "num_params", "wall_time_s", "device", "versions", "git_commit", "seed")


def config_key(config: RunConfig) -> str:
    """A stable hash of the fields that determine a run's result.

    >>> config_key(RunConfig(device="cpu")) == config_key(RunConfig(device="auto", profile="x"))
    True
    """
    values = {k: v for k, v in config.to_dict().items() if k not in NOT_IN_KEY}
    for name in ("validation_size", "ema_horizons", "secure_noise"):  # added later: runs without them keep their keys
        if not values[name]:
            del values[name]
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _runs_dir(config: RunConfig, runs_dir) -> Path:
    return Path(runs_dir) if runs_dir is not None else default_runs_dir(config.profile)


def record_path(config: RunConfig, runs_dir: str | os.PathLike | None = None) -> Path:
    return _runs_dir(config, runs_dir) / f"{model_tag(config.model, config.group)}-{config_key(config)}.json"


def _finite_or_null(value):
    """JSON has no NaN or infinity: a diverged run's losses are recorded as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def write_json_atomic(path: Path, content: dict) -> None:
    content = _finite_or_null(content)
    write_atomic(path, lambda handle: json.dump(content, handle, indent=1, allow_nan=False))


class RunLocked(RuntimeError):
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
    record["digest"] = record_digest(record)
    write_json_atomic(path, record)
    record_written(path)  # in a reference folder (allowed by the caller): the manifest lists it
    return record


def record_digest(record: dict) -> str:
    """SHA-256 of a record's content as JSON stores it (without ``digest`` and ``source``): a record
    edited after it was written no longer matches. This catches accidental or casual edits; it is
    not a signature (anyone can recompute it)."""
    content = {k: v for k, v in record.items() if k not in ("digest", "source")}
    text = json.dumps(_finite_or_null(content), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


class RecordError(ValueError):
    """A file that should be a run record is not one, or does not describe what it claims."""


def read_record(path: str | os.PathLike) -> dict:
    """A record, verified: valid JSON with the required fields, a config whose key is the record's key
    and the file name's, and (private runs) ε spent within the target."""
    path = Path(path)
    verify_shipped(path)
    try:
        with open(path) as handle:
            record = json.load(handle)
    except json.JSONDecodeError as err:
        raise RecordError(f"{path} is not valid JSON ({err}); delete it (or retrain with --force)") from err
    if not isinstance(record, dict):
        raise RecordError(f"{path} is not a dpeq run record (not a JSON object)")
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        raise RecordError(f"{path} is not a dpeq run record (missing {missing})")
    try:
        config = RunConfig(**record["config"])
    except (TypeError, ValueError) as err:
        raise RecordError(f"{path}: its config is not a valid run config ({err})") from err
    if config_key(config) != record["key"] or not path.name.endswith(f"-{record['key']}.json"):
        raise RecordError(f"{path}: its config hashes to {config_key(config)}, but the record says {record['key']} "
                          "and the file name another: it was edited or copied; delete it (or retrain with --force)")
    eps = record["epsilon_spent"]
    if not config.non_private and (eps is None or eps > config.target_epsilon):
        raise RecordError(f"{path}: ε spent {eps} is not within the target {config.target_epsilon}")
    if "digest" in record and record_digest(record) != record["digest"]:
        raise RecordError(f"{path}: its content was changed after it was written (digest mismatch); delete it "
                          "(or retrain with --force)")
    return record


def find_record(config: RunConfig, runs_dir: str | os.PathLike | None = None) -> Path | None:
    """Where the record of ``config`` is, if anywhere. Lookup order: the records shipped with the
    project (``data/reference/<profile>/``), then the user's runs folder (``runs_dir``, default
    ``data/runs/<profile>/``)."""
    return find_file(record_path(config, runs_dir).name, config.profile, runs_dir)


def find_file(relative: str | os.PathLike, profile: str, runs_dir: str | os.PathLike | None = None) -> Path | None:
    """``relative`` (a path inside a profile's records folder) in the shipped records first
    (``data/reference/<profile>/``), then in the user's runs folder (default ``data/runs/<profile>/``)."""
    user = Path(runs_dir) if runs_dir is not None else default_runs_dir(profile)
    for folder in (reference_dir(profile), user):
        if (folder / relative).is_file():
            return folder / relative
    return None


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


def load_records(runs_dir: str | os.PathLike) -> list[dict]:
    """Every record in a folder (temporary files of interrupted writes are ignored)."""
    return [read_record(p) for p in sorted(Path(runs_dir).glob("*.json"))]


def find_records(profile: str, runs_dir: str | os.PathLike | None = None) -> list[dict]:
    """Every record of a profile that :func:`find_record` would find: shipped ones first, then the
    user's (a user's record of a shipped config is shadowed, as in the lookup)."""
    found: dict[str, dict] = {}
    user = Path(runs_dir) if runs_dir is not None else default_runs_dir(profile)
    for folder in (reference_dir(profile), user):
        if folder.is_dir():
            for record in load_records(folder):
                found.setdefault(record["key"], record)
    return list(found.values())


def results_table(records) -> "pd.DataFrame":
    """One row per run: the config fields, then the derived and measured values (no history)."""
    import pandas as pd

    if isinstance(records, (str, os.PathLike)):
        records = load_records(records)
    rows = []
    for record in records:
        row = dict(record["config"])
        row["widths"] = tuple(row["widths"])
        row.update({k: v for k, v in record.items() if k not in ("config", "history", "versions", "source")})
        rows.append(row)
    return pd.DataFrame(rows)


def sweep(base: RunConfig, variations: list[dict], runs_dir: str | os.PathLike | None = None,
          progress: bool = True) -> "pd.DataFrame":
    """``load_or_run`` for ``base`` changed by each dict in ``variations``; the results table of those runs.

    Only missing runs are trained; each dataset is loaded once for all the runs that share it.
    """
    from tqdm import tqdm  # text, not a widget: it renders in static notebooks too

    from .data import load_splits

    datasets, records = {}, []
    configs = [base.replace(**change) for change in variations]
    for config in tqdm(configs, desc="runs", disable=not progress):
        data = None
        if find_record(config, runs_dir) is None:
            data_key = (config.dataset, config.train_size, config.test_size, config.validation_size, config.seed)
            if data_key not in datasets:
                datasets[data_key] = load_splits(config.dataset, train_size=config.train_size, test_size=config.test_size,
                                                 validation_size=config.validation_size, seed=config.seed)
            data = datasets[data_key]
        records.append(load_or_run(config, runs_dir, progress=False, data=data))
    return results_table(records)
