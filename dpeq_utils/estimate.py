"""How long training what is missing would take, and asking before it takes long.

A notebook whose records are missing (a renamed copy of the ``teach`` profile finds none shipped)
would otherwise start hours of training without a word. Under ``train_missing=None`` (the notebooks'
default) an estimate (:func:`training_question`) lets training go ahead only when it is estimated to take at most
:data:`ASK_ABOVE_MINUTES`; otherwise it says how long it would take and how to ask for it
(``train_missing=True``).

The estimate (:func:`minutes_to_train`) divides each run's examples·views by the throughput that
records of runs with the same kind of step measured (:func:`dpeq_utils.sweep.step_kind`): this
profile's records, and every shipped profile's. A kind of step no record measures is timed here:
one logical step after a warm-up one.
"""

from __future__ import annotations

import functools
import time

from .config import RunConfig
from .errors import DpeqError

#: A class can wait this long for a notebook to train what is missing, not for hours.
ASK_ABOVE_MINUTES = 5.0


def minutes_to_train(configs: list[RunConfig], profile: str, runs_dir=None,
                     measure_unknown: bool = True) -> tuple[float | None, str]:
    """Minutes ``configs`` would train, and on what basis; None where a kind of step is measured by
    no record and ``measure_unknown`` is False."""
    from .paths import profiles_dir, reference_dir
    from .records import find_records, load_records
    from .sweep import estimate_hours, step_kind

    timings = find_records(profile, runs_dir)
    root = reference_dir()
    for folder in sorted(root.iterdir()) if root.is_dir() else []:  # data/reference/<profile>/
        if folder.name != profile and (profiles_dir() / f"{folder.name}.yaml").is_file():
            timings += load_records(folder)
    hours, basis = estimate_hours(configs, None, timings)
    if hours is None and measure_unknown:
        measured = {step_kind(RunConfig(**r["config"])) for r in timings}
        for kind, config in {step_kind(c): c for c in configs}.items():
            if kind not in measured:
                # one timing per kind of step: the same cache entry whatever the run's length
                timings.append(one_step_timing(config.replace(update_steps=2, eval_every=0)))
        hours, basis = estimate_hours(configs, None, timings)
    return (None if hours is None else hours * 60), basis


@functools.lru_cache(maxsize=64)
def one_step_timing(config: RunConfig) -> dict:
    """A record-shaped timing of ``config``'s second logical step on this machine (the first warms
    up the kernels and the allocator); timed once per process (a kind of step costs what it cost)."""
    from .train import setup, train_step

    state = setup(config.replace(update_steps=2, eval_every=0))
    train_step(state)
    started = time.perf_counter()
    train_step(state)
    return {"config": config.to_dict(), "steps": 1, "mean_batch_size": state.batch_sizes[-1],
            "train_time_s": time.perf_counter() - started, "device": "one step timed here"}


class TrainingNotRequested(DpeqError, RuntimeError):
    """Records are missing and training them was not asked for (``train_missing`` False, or None
    and the training would be long)."""


def training_question(what: str, estimate: tuple[float | None, str], profile: str, how: str = "") -> str | None:
    """Under ``train_missing=None``: None when the ``estimate`` (:func:`minutes_to_train`) is at most
    :data:`ASK_ABOVE_MINUTES` (go ahead); otherwise what to tell the user: how long ``what`` would
    train and how to ask for it."""
    minutes, basis = estimate
    if minutes is not None and minutes <= ASK_ABOVE_MINUTES:
        return None
    return (f"[{profile}] not training {what}: " + ("an unknown time" if minutes is None else f"about {minutes:.0f} min")
            + f" ({basis}). To train, set train_missing=True" + (f" {how}" if how else "") + ".")
