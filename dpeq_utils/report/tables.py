"""Each part's table, computed from the study's records.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..study import Study
from .cost import typical_step_seconds
from .stats import paired_interval, summarise

# ---------------------------------------------------------------------------------------------- part A


def part_a(study: Study, records=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the learning-rate grid on validation, the per-model summary at the chosen rates)."""
    table = study.table("A", records)
    if table.empty:
        return table, table
    grid = table[table["stage"] == "grid"][["model", "lr", "val_accuracy", "val_accuracy_ema"]]
    records = study.records() if records is None else records
    chosen = {m: study.chosen_lr(records, m) for m in study.spec["models"]}
    grid = grid.assign(chosen=[chosen.get(m) == lr for m, lr in zip(grid["model"], grid["lr"])])
    final = table[[chosen.get(m) == lr for m, lr in zip(table["model"], table["lr"])]]
    rows = []
    for model, part in final.groupby("model", sort=False):
        raw, ema = summarise(part, ["model"], "test_accuracy").iloc[0], summarise(part, ["model"]).iloc[0]
        rows.append({"model": model, "parameters": int(part["num_params"].iloc[0]), "lr": chosen[model],
                     "seeds": int(ema["runs"]), "test accuracy": raw["mean"], "± (95 %)": raw["ci95"],
                     "std": raw["std"], "test accuracy (EMA)": ema["mean"], "EMA ± (95 %)": ema["ci95"],
                     "EMA std": ema["std"], "train time per run (s)": float(part["train_time_s"].median()),
                     "s per step": typical_step_seconds(records[part["key"].iloc[0]], records)})
    return grid.reset_index(drop=True), pd.DataFrame(rows)


def paired_gap(study: Study, model: str, other: str, records=None, value: str = "test_accuracy_ema") -> dict | None:
    """``model`` minus ``other`` on the same seeds (same training subset and batches' seed), each at its
    chosen rate: mean difference and its 95 % interval; None without two common seeds."""
    records = study.records() if records is None else records
    table = study.table("A", records)
    if table.empty:
        return None
    picks = {}
    for name in (model, other):
        lr = study.chosen_lr(records, name)
        part = table[(table["model"] == name) & (table["lr"] == lr)]
        picks[name] = part.set_index("seed")[value]
    common = sorted(set(picks[model].index) & set(picks[other].index))
    if len(common) < 2:
        return None
    mean, half = paired_interval([picks[model][s] for s in common], [picks[other][s] for s in common])
    return {"mean": mean, "ci95": half, "seeds": len(common)}


# ---------------------------------------------------------------------------------------------- B, C, D


def part_b(study: Study, records=None) -> pd.DataFrame:
    """Mean and interval of EMA test accuracy per model and ε (``inf``: non-private), over seeds."""
    table = study.table("B", records)
    if table.empty:
        return table
    table = table[table["stage"] == ""].assign(
        epsilon=lambda t: np.where(t["non_private"], np.inf, t["target_epsilon"]))
    return summarise(table, ["model", "epsilon"]).sort_values(["model", "epsilon"]).reset_index(drop=True)


def part_c(study: Study, records=None) -> pd.DataFrame:
    table = study.table("C", records)
    if table.empty:
        return table
    return table[["label", "key", "group", "restrict", "head", "num_params", "test_accuracy", "test_accuracy_ema",
                  "val_accuracy_ema", "train_time_s", "test_size"]].reset_index(drop=True)


def part_d(study: Study, records=None) -> pd.DataFrame:
    """Test accuracy (raw and EMA) along training for each model and length: one row per evaluation."""
    records = study.records() if records is None else records
    table = study.table("D", records)
    rows = []
    for _, row in table.iterrows():
        record = records[row["key"]]
        for h in record["history"]:
            rows.append({"model": row["model"], "length": int(row["update_steps"]), "step": h["step"],
                         "epsilon spent": h["epsilon"], "test_accuracy": h["test_accuracy"],
                         "test_accuracy_ema": h["test_accuracy_ema"], "test_loss": h["test_loss"],
                         "test_loss_ema": h["test_loss_ema"], "lr": row["lr"],
                         "noise_multiplier": row["noise_multiplier"], "train_time_s": row["train_time_s"]})
    return pd.DataFrame(rows)
