"""Checkpoints: a run's progress on disk, so an interrupted run continues where it stopped and ends
exactly as if it never stopped.

A checkpoint sits beside the run's record, named like it with ``.ckpt`` instead of ``.json`` (so it
is keyed by the same config key), and holds :meth:`dpeq_utils.run_state.RunState.state_dict`: the
parameters, the optimiser's momentum, the EMAs, the steps the privacy budget has counted, the state
of every random generator (sampler, augmentation, noise, variants, and Python's, NumPy's and torch's
global ones), the variants' state (pruning masks, ModelMix's previous iterate), the history, the
batch sizes and the time spent so far. It is written every ``checkpoint_every`` steps (None: every
:data:`DEFAULT_INTERVAL_S` seconds of training) and at the end of the step during which SIGINT,
SIGTERM or SIGUSR2 arrived, then removed once the record is written.

**Why resuming spends no extra privacy.** A resumed run restores every generator, so it redraws the
same batches, views and noise as the uninterrupted run: on a CPU it ends bit for bit where the
uninterrupted run ends (``tests/test_checkpoint.py``), and steps lost to a crash after the last
checkpoint are recomputed with the same draws, never released. ε is computed once, from the steps
the restored budget has counted, so a resume neither resets nor double-counts it.

**What is never trusted.** The file starts with a header line carrying the SHA-256 of the rest; a
truncated or corrupt file fails that check. Its size bounds what it loads: torch.save stores its
entries uncompressed, so a compressed entry (a small file inflating to gigabytes) is refused from the
archive's directory, and loaded content expanding past a few million values is refused before it
reaches a run or a record. The SHA-256 only proves the file is whole, not who wrote
it (anyone can recompute it), so the content is read with ``torch.load(weights_only=True)``: tensors,
dicts, lists, tuples, numbers and strings, never an arbitrary pickled object, so a crafted checkpoint
in a shared runs folder cannot run code (NumPy's generator state is stored as a tensor and numbers
for that reason). A checkpoint whose config key, budget (σ, q, steps), device type or
arithmetic-relevant library versions differ from the run's is refused, and so is a secure run's
checkpoint that holds sampler, augmentation or noise states (a secure run never writes them; found
there, someone wrote them in to make the run's draws known). So is one written by other
dpeq code (another :data:`dpeq_utils.provenance.CODE` source hash), unless the caller passes
``other_code=True`` (``--resume-other-code``); the record then lists every code version the run
was trained with (``code_history``). Each refusal
is a :class:`CheckpointError` that says what to do (``--no-resume`` starts over). Writes are atomic
(temporary file, fsync, rename), so a process killed while writing leaves the previous checkpoint
intact; a failed periodic write (e.g. a full disk) is reported and training goes on.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import time
import warnings
import zipfile
from pathlib import Path

import torch

from .bounds import expansion_problem
from .errors import DpeqError
from .paths import write_atomic
from .provenance import CODE
from .runtime import library_versions, to_device

#: 2: loadable with weights_only=True, carries the writing code's source hash (format 1 was neither)
FORMAT = 2
MAGIC = "dpeq-checkpoint"
#: Seconds of training between two checkpoints when ``checkpoint_every`` is None.
DEFAULT_INTERVAL_S = 300.0
#: Libraries whose version changes the arithmetic of a step: a checkpoint must come from the same ones.
ARITHMETIC_LIBRARIES = ("python", "torch", "escnn", "opacus", "numpy")
CPU = torch.device("cpu")


class CheckpointError(DpeqError, ValueError):
    """A checkpoint that cannot be used to continue this run; the message says what to do."""


def checkpoint_path(record_path: str | os.PathLike) -> Path:
    return Path(record_path).with_suffix(".ckpt")


def _temp_files(path: Path) -> list[Path]:
    return list(path.parent.glob(f".{path.name}.*.tmp"))


def write_checkpoint(path: Path, content: dict) -> None:
    """Atomically write ``content`` (torch-serialised) behind a header with its SHA-256."""
    buffer = io.BytesIO()
    torch.save(content, buffer)
    payload = buffer.getvalue()
    header = f"{MAGIC} {FORMAT} {hashlib.sha256(payload).hexdigest()}\n".encode()
    # owner-only, as the temporary file is created: it holds the run's generator states
    write_atomic(path, lambda handle: _write(handle, header + payload), binary=True, user_readable=False)


def _write(handle, data: bytes) -> None:  # one seam, so tests can simulate a full disk
    handle.write(data)


def read_checkpoint(path: Path) -> dict:
    """The content of a checkpoint, after checking its header and SHA-256."""
    advice = "delete it or rerun with --no-resume to start the run over"
    data = path.read_bytes()
    header, _, payload = data.partition(b"\n")
    parts = header.decode("utf-8", "replace").split()
    if len(parts) != 3 or parts[0] != MAGIC:
        raise CheckpointError(f"{path} is not a dpeq checkpoint; {advice}")
    if parts[1] != str(FORMAT):
        raise CheckpointError(f"{path} has checkpoint format {parts[1]}, this dpeq reads {FORMAT}; {advice}")
    if hashlib.sha256(payload).hexdigest() != parts[2]:
        raise CheckpointError(f"{path} is truncated or corrupt (SHA-256 mismatch); {advice}")
    _check_entries(payload, path, advice)
    try:  # weights_only: plain containers and tensors, never code
        content = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises UnpicklingError or RuntimeError for what it will not load
        raise CheckpointError(f"{path} holds objects a dpeq checkpoint never contains (refused without loading "
                              f"them: {str(err).splitlines()[0][:200]}); {advice}") from None
    _check_size(content, path, advice)
    return content


def _check_entries(payload: bytes, path: Path, advice: str) -> None:
    """torch.save writes a zip archive of *stored* (uncompressed) entries, so what a checkpoint loads
    is no bigger than the file. An entry compressed by anything else could inflate a small file to
    gigabytes: refused from the archive's directory, before anything is inflated."""
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path} is not a checkpoint torch.save wrote ({err}); {advice}") from None
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED or entry.file_size != entry.compress_size:
            raise CheckpointError(
                f"{path} holds a compressed entry ({entry.filename[:80]}: {entry.compress_size:,} bytes that would "
                f"inflate to {entry.file_size:,}); torch.save writes none, so something else rewrote the file: refused "
                f"without inflating it; {advice}")


#: Values (every list item, dict entry, tensor and number) a checkpoint's content may hold, counting a
#: list as often as it is repeated: a long run holds one batch size per step and one history entry per
#: evaluation, far fewer. A few bytes of pickle can repeat one list inside itself (or put it inside
#: itself) to make its expansion, a record's JSON, astronomically large (or endless).
MAX_VALUES = 1_000_000
MAX_DEPTH = 32


def _check_size(content, path: Path, advice: str) -> None:
    """Refuse ``content`` if it expands past :data:`MAX_VALUES` values, nests deeper than
    :data:`MAX_DEPTH` or contains itself (:func:`dpeq_utils.bounds.expansion_problem`)."""
    problem = expansion_problem(content, MAX_VALUES, MAX_DEPTH)
    if problem:
        raise CheckpointError(f"{path} holds {problem}, which a dpeq checkpoint never does: refused; {advice}")


class Checkpoints:
    """The checkpoints of one run: what :func:`dpeq_utils.train.fit` calls to resume and to save.

    ``key`` is the run's config key; ``resume=False`` deletes an existing checkpoint and starts over;
    ``every`` is ``config.checkpoint_every``.
    """

    def __init__(self, path: Path, key: str, resume: bool = True, every: int | None = None,
                 interval_s: float = DEFAULT_INTERVAL_S, other_code: bool = False):
        self.path, self.key, self.resume_allowed, self.other_code = Path(path), key, resume, other_code
        self.every, self.interval_s = every, interval_s
        self.last_saved = time.monotonic()
        versions = library_versions()  # read once per run, not at every save
        self.versions = {name: versions.get(name) for name in ARITHMETIC_LIBRARIES}

    def identity(self, state) -> dict:
        """What must match for a checkpoint to continue ``state``'s run."""
        budget = state.budget
        return {"key": self.key, "device_type": state.device.type,
                "versions": self.versions, "source_sha256": CODE["source_sha256"],
                "budget": {"noise_multiplier": budget.noise_multiplier if budget else None,
                           "sample_rate": state.sample_rate, "steps": state.steps}}

    def resume(self, state) -> None:
        """Load the checkpoint into ``state`` (just built by ``setup``) if there is one and resuming is allowed."""
        for stale in _temp_files(self.path):  # left by a process killed while writing; we hold the run's lock
            stale.unlink(missing_ok=True)
        if not self.path.exists():
            return
        if not self.resume_allowed:
            self.path.unlink()
            print(f"[dpeq] starting over: removed the checkpoint {self.path.name}", file=sys.stderr)
            return
        content = read_checkpoint(self.path)
        saved = content.get("identity", {})
        for field, value in self.identity(state).items():
            if field == "source_sha256" and saved.get(field) != value and self.other_code:
                print(f"[dpeq] {self.path.name} was written by other dpeq code (source {str(saved.get(field))[:12]}, "
                      f"this is {value[:12]}); continuing as asked: the record will list both", file=sys.stderr)
                continue
            if field == "source_sha256" and saved.get(field) != value:
                raise CheckpointError(
                    f"{self.path} was written by other dpeq code (source {str(saved.get(field))[:12]}, this checkout "
                    f"is {value[:12]} at {CODE['git_commit']}): its steps may have been computed differently. "
                    "Rerun with --resume-other-code to continue anyway (the record then lists every code version "
                    "the run was trained with), or --no-resume to start over")
            if saved.get(field) != value:
                theirs, ours = saved.get(field), value
                if isinstance(theirs, dict) and isinstance(ours, dict):  # name only what differs
                    theirs, ours = ({k: d.get(k) for k in ours if theirs.get(k) != ours.get(k)} for d in (theirs, ours))
                raise CheckpointError(
                    f"{self.path} does not continue this run: it was written with {field} {theirs}, this run has "
                    f"{ours}; rerun with --no-resume to start over (or delete the checkpoint)")
        if state.config.secure_noise:  # a secure run never saves these streams: states found here were written in
            from .train import SECRET_STREAMS

            injected = sorted(set(SECRET_STREAMS) & set(content["state"].get("generators", {})))
            if injected:
                raise CheckpointError(
                    f"{self.path} belongs to a secure run (secure_noise) but holds the states of its {', '.join(injected)} "
                    "generators, which a secure run never writes: resuming from them would make its batches, views and "
                    "noise known to whoever wrote them. Refused; delete it or rerun with --no-resume to start over")
        state.load_state_dict(content["state"])
        state.resumes.append(state.step)
        if state.config.secure_noise:
            print("[dpeq] secure run: sampling, augmentation and noise continue from fresh OS entropy (their states "
                  "were never saved), so this run cannot be repeated bit for bit", file=sys.stderr)
        spent = f", ε spent so far {state.budget.epsilon():.3f}" if state.budget and state.step else ""
        print(f"[dpeq] resuming {self.path.stem} from step {state.step} of {state.steps}{spent}", file=sys.stderr)

    def after_step(self, state, signalled: bool = False) -> None:
        """Save if a signal arrived, every ``every`` steps, or (``every`` None) after ``interval_s``."""
        if signalled:
            self.save(state)
            print(f"[dpeq] checkpoint written at step {state.step} of {state.steps}: {self.path}; "
                  "rerun the same command to resume", file=sys.stderr)
            return
        if state.step == state.steps:
            return  # finished: the record comes next
        if self.every is None:
            due = time.monotonic() - self.last_saved >= self.interval_s
        else:
            due = self.every > 0 and state.step % self.every == 0
        if due:
            try:
                self.save(state)
            except OSError as err:  # a periodic save may fail (disk full); the run and the last checkpoint survive
                warnings.warn(f"could not write the checkpoint {self.path} at step {state.step} ({err}); "
                              "training goes on, the previous checkpoint is kept", RuntimeWarning, stacklevel=2)

    def save(self, state) -> None:
        # host copies: a checkpoint is read onto the CPU and put back on the run's device by RunState.load_state_dict
        write_checkpoint(self.path, {"identity": self.identity(state), "state": to_device(state.state_dict(), CPU)})
        self.last_saved = time.monotonic()

    def remove(self) -> None:
        """After the record is written: the run is complete, its checkpoint is obsolete."""
        self.path.unlink(missing_ok=True)
