"""Seconds per step (the fastest of the runs with the same arithmetic) and the compute of the
published recipes (one benchmark run on an idle machine).
"""

from __future__ import annotations

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
    return step_seconds(records)[_cost_key(record["config"], record["device"])]


def recipe_compute(study: Study | None = None, records=None) -> pd.DataFrame:
    """Compute of the published recipes (the paper's run; De et al.'s ε = 8 setting, both from the
    ``paper`` profile): their example-view gradients times the cost of one, as measured for each
    recipe's model *with its views* in one benchmark run on an idle machine
    (``data/reference/benchmark/compute.json``, written by ``benchmarks/per_sample_speed.py
    --compute-record``). Empty until that file exists: study runs shared the CPU with other work and
    ran at other commits, so their timings are not used for this comparison."""
    import json

    from ..benchmark import COMPUTE_RECORD
    from ..paths import reference_dir
    from ..shipped import verify_shipped

    path = reference_dir() / COMPUTE_RECORD
    if not path.is_file():
        return pd.DataFrame()
    verify_shipped(path)
    measured = json.loads(path.read_text())
    names = {"paper": "paper: equivariant ResNet-9, ε = 8", "de_et_al_eps8": "De et al. ε = 8 (WRN-16-4)"}
    rows = []
    for key, name in names.items():
        recipe = measured["recipes"][key]
        views = recipe["steps"] * recipe["batch_size"] * recipe["views"]
        per_view = recipe["ms_per_example_view"] / 1000
        rows.append({"recipe": name, "model": recipe["model"], "steps": recipe["steps"], "batch": recipe["batch_size"],
                     "views": recipe["views"], "example-view gradients": views,
                     "ms per example-view (this CPU)": 1000 * per_view, "CPU hours (2 cores)": views * per_view / 3600,
                     "machine": _machine(measured)})
    return pd.DataFrame(rows)


def _machine(measured: dict) -> str:
    """The benchmark's machine in one phrase: its CPU and cores (or the device alone for older records)."""
    machine = measured.get("machine") or {}
    if "cpu" not in machine:
        return measured["device"]
    gpu = f", {machine['gpu']}" if "gpu" in machine else ""
    return f"{machine['cpu']}, {machine.get('cores', '?')} cores{gpu}, torch {machine.get('torch', '?')}"
