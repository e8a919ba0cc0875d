"""Seconds per step (the fastest of the runs with the same arithmetic) and the compute of the
published recipes (one benchmark run on an idle machine).
"""

from __future__ import annotations

import statistics

import pandas as pd

from ..config import cost_key
from ..study import Study

# ---------------------------------------------------------------------------------------------- cost




def step_seconds(records: dict[str, dict]) -> dict[tuple, float]:
    """Training-loop seconds per logical step: the fastest of every record with the same arithmetic
    (:func:`dpeq_utils.config.cost_fields`: marked ``cost`` in the config). The fastest, because
    sharing the machine with other work only ever slows a run down: the minimum is the closest to the
    cost on an idle machine."""
    times: dict[tuple, list[float]] = {}
    for record in records.values():
        key = _cost_key(record["config"], record["device"])
        times.setdefault(key, []).append(record["train_time_s"] / record["steps"])
    return {key: float(min(values)) for key, values in times.items()}


def _cost_key(config: dict, device: str) -> tuple:
    return cost_key({**config, "device": device})


def typical_step_seconds(record: dict, records: dict[str, dict]) -> float:
    """Seconds per logical step of ``record``'s arithmetic: the fastest run of it (:func:`step_seconds_range`)."""
    return step_seconds_range(record, records)["fastest"]


def step_seconds_range(record: dict, records: dict[str, dict]) -> dict:
    """Seconds per logical step of every record with ``record``'s arithmetic: the fastest (what
    :func:`typical_step_seconds` reports), the slowest and how many runs; the ratio of the two is how
    much the machine's load moved the same arithmetic's wall clock."""
    key = _cost_key(record["config"], record["device"])
    times = [r["train_time_s"] / r["steps"] for r in records.values() if _cost_key(r["config"], r["device"]) == key]
    return {"fastest": min(times), "slowest": max(times), "runs": len(times)}


RECIPE_NAMES = {"paper": "paper: equivariant ResNet-9, ε = 8", "de_et_al_eps8": "De et al. ε = 8 (WRN-16-4)",
                "de_et_al_eps8_wrn40_4": "De et al. ε = 8 with WRN-40-4"}


def compute_measurement() -> dict | None:
    """The shipped compute record (``data/reference/benchmark/compute.json``, written by
    ``benchmarks/per_sample_speed.py --compute-record``), verified against the manifest; None if absent."""
    import json

    from ..benchmark import COMPUTE_RECORD
    from ..paths import reference_dir
    from ..shipped import verify_shipped

    path = reference_dir() / COMPUTE_RECORD
    if not path.is_file():
        return None
    verify_shipped(path)
    return json.loads(path.read_text())


def recipe_compute(study: Study | None = None, records=None) -> pd.DataFrame:
    """Compute of the published recipes (the paper's run; De et al.'s ε = 8 setting with WRN-16-4 and
    with WRN-40-4, from the ``paper`` profile): their example-view gradients times the cost of one, as
    measured for each recipe's model *with its views* in interleaved rounds of one benchmark run on an
    idle machine (:func:`compute_measurement`): the median over rounds, and the lowest and highest.
    Empty until that file exists: study runs shared the CPU with other work and ran at other commits,
    so their timings are not used for this comparison."""
    measured = compute_measurement()
    if measured is None:
        return pd.DataFrame()
    rows = []
    for key, recipe in measured["recipes"].items():
        views = recipe["steps"] * recipe["batch_size"] * recipe["views"]
        rounds = recipe.get("ms_per_example_view_rounds", [recipe["ms_per_example_view"]])
        rows.append({"key": key, "recipe": RECIPE_NAMES.get(key, key), "model": recipe["model"],
                     "steps": recipe["steps"], "batch": recipe["batch_size"], "views": recipe["views"],
                     "example-view gradients": views, "ms per example-view (this CPU)": recipe["ms_per_example_view"],
                     "lowest ms": min(rounds), "highest ms": max(rounds), "rounds": len(rounds),
                     "CPU hours (2 cores)": views * recipe["ms_per_example_view"] / 1000 / 3600,
                     "hours by round": [views * ms / 1000 / 3600 for ms in rounds], "machine": _machine(measured)})
    return pd.DataFrame(rows)


def compute_ratio(compute: pd.DataFrame, other: str) -> dict | None:
    """The paper's recipe's CPU hours over ``other``'s: the median of the per-round ratios (a round times
    both recipes back to back, so its ratio shares that round's machine speed), and their range."""
    rows = compute.set_index("key")
    if "paper" not in rows.index or other not in rows.index:
        return None
    ratios = [p / o for p, o in zip(rows.loc["paper", "hours by round"], rows.loc[other, "hours by round"])]
    return {"median": statistics.median(ratios), "low": min(ratios), "high": max(ratios), "rounds": len(ratios)}


def _machine(measured: dict) -> str:
    """The benchmark's machine in one phrase: its CPU and cores (or the device alone for older records)."""
    machine = measured.get("machine") or {}
    if "cpu" not in machine:
        return measured["device"]
    gpu = f", {machine['gpu']}" if "gpu" in machine else ""
    return f"{machine['cpu']}, {machine.get('cores', '?')} cores{gpu}, torch {machine.get('torch', '?')}"
