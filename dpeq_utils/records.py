"""The record store: config → key → one JSON file per run; write, read and verify, find, tabulate.

Training a missing run is :mod:`dpeq_utils.runs`, which depends on this module, never the reverse.

A record is written atomically (a temporary file in the same folder, then a rename), so a crash
never leaves a half-written record that a later ``load_or_run`` would trust. Its name is
``<model>-<group>-<key>.json``, where the key hashes every config field that can change the result.
Left out: ``profile`` (a label), and the performance settings (``device``, ``physical_batch_size``,
``per_sample_engine``, ``checkpoint_every``: each field's role is metadata in
:mod:`dpeq_utils.config`), which change where and how fast a run computes and its float32 rounding, never a random draw: the
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
``test_loss``, ``num_params``, ``wall_time_s``, ``device``, ``machine`` (the CPU model, its vector
units, torch's CPU capability and threads, and on CUDA the GPU with its TF32 and determinism settings:
:mod:`dpeq_utils.machine`; records before 2026-12-06 have none; ``machine_history`` only for a run
resumed on another kind of machine), ``versions``, ``git_commit`` and
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

import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .config import RunConfig, key_fields
from .errors import DpeqError
from .models import model_tag
from .paths import reference_dir, write_atomic
from .paths import runs_dir as default_runs_dir
from .shipped import record_written, verify_shipped

if TYPE_CHECKING:
    import pandas as pd

SCHEMA = 1
REQUIRED_FIELDS = ("key", "config", "noise_multiplier", "sample_rate", "steps", "epsilon_spent", "test_accuracy",
                   "test_accuracy_ema", "num_params", "wall_time_s", "device", "versions", "git_commit", "seed")


def config_key(config: RunConfig) -> str:
    """A stable hash of the fields that determine a run's result.

    >>> config_key(RunConfig(device="cpu")) == config_key(RunConfig(device="auto", profile="x"))
    True
    """
    return hashlib.sha256(json.dumps(key_fields(config), sort_keys=True).encode()).hexdigest()[:16]


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

def write_record(path: Path, record: dict) -> dict:
    """Stamp ``record`` with its digest and write it atomically; in a folder of shipped records (the
    caller checked it may: :func:`dpeq_utils.shipped.guard_write`) the manifest lists it."""
    record = {**record, "digest": record_digest(record)}
    write_json_atomic(path, record)
    record_written(path)
    return record


def record_digest(record: dict) -> str:
    """SHA-256 of a record's content as JSON stores it (without ``digest`` and ``source``): a record
    edited after it was written no longer matches. This catches accidental or casual edits; it is
    not a signature (anyone can recompute it)."""
    content = {k: v for k, v in record.items() if k not in ("digest", "source")}
    text = json.dumps(_finite_or_null(content), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


class RecordError(DpeqError, ValueError):
    """A file that should be a run record is not one, or does not describe what it claims."""


#: A record is tens of kilobytes (its history grows by one entry per evaluation); a file larger than
#: this is not one and is not parsed.
MAX_RECORD_BYTES = 64 * 2 ** 20


def _load_json(path: Path, remedy: str):
    """A record file's JSON, bounded: refused unread above :data:`MAX_RECORD_BYTES`, and one sentence
    (not a traceback) for malformed or absurdly nested JSON."""
    size = path.stat().st_size
    if size > MAX_RECORD_BYTES:
        raise RecordError(f"{path} is {size / 2 ** 20:.0f} MB, far larger than any dpeq record: not read; {remedy}")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecordError(f"{path} is not valid JSON ({str(err)[:200]}); {remedy}") from None
    except RecursionError:
        raise RecordError(f"{path} nests lists or objects deeper than JSON can be read here (no dpeq record does); "
                          f"{remedy}") from None


def read_record(path: str | os.PathLike) -> dict:
    """A record, verified: valid JSON with the required fields, a config whose key is the record's key
    and the file name's, and (private runs) ε spent within the target."""
    path = Path(path)
    verify_shipped(path)
    record = _load_json(path, "delete it (or retrain with --force)")
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


def read_keyed_record(path: Path, schema: str, key: str, what: str, remedy: str, require_digest: bool = False) -> dict:
    """A record kept beside the run records (an audit's, a mechanism measurement's), verified: a
    shipped one against the manifest, its ``schema`` and ``key`` against what the caller expects
    (``what``: "an audit record of this run"), its content against its digest; ``remedy`` ends each
    message (a record without a digest passes unless ``require_digest``: audit records from before
    digests existed). Returned with its ``source``."""
    verify_shipped(path)
    record = _load_json(path, remedy)
    if not isinstance(record, dict) or record.get("schema") != schema or record.get("key") != key:
        raise RecordError(f"{path}: not {what} (schema or key differs); {remedy}")
    if ("digest" in record or require_digest) and record_digest(record) != record.get("digest"):
        raise RecordError(f"{path}: its content was changed after it was written (digest mismatch); {remedy}")
    return {**record, "source": str(path)}


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
