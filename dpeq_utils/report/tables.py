"""Each part's table, computed from the study's records.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from ..plotting import MODEL_LABELS
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


def runs_by_seed(table: pd.DataFrame, model: str, lr: float | None, value: str = "test_accuracy_ema",
                 **fields) -> dict[int, float]:
    """``value`` per seed of ``model``'s runs at rate ``lr`` (and ``fields``, e.g. ``aug_mult=4``) in a
    part's table; empty when the rate is not chosen yet or the part has no records."""
    if lr is None or table.empty:
        return {}
    rows = table[(table["model"] == model) & (table["lr"] == lr)]
    for name, wanted in fields.items():
        rows = rows[rows[name] == wanted]
    return {int(s): float(v) for s, v in zip(rows["seed"], rows[value])}


def paired_by_seed(first: dict[int, float], second: dict[int, float]) -> dict | None:
    """``first`` minus ``second`` on their common seeds: mean difference, its 95 % paired t half-width,
    the seeds and the per-seed gaps; None without two common seeds."""
    seeds = sorted(set(first) & set(second))
    if len(seeds) < 2:
        return None
    mean, half = paired_interval([first[s] for s in seeds], [second[s] for s in seeds])
    return {"mean": mean, "ci95": half, "seeds": seeds, "gaps": [first[s] - second[s] for s in seeds]}


def paired_gap(study: Study, model: str, other: str, records=None, value: str = "test_accuracy_ema") -> dict | None:
    """Part A's ``model`` minus ``other`` on the same seeds (same training subset and batches' seed),
    each at its chosen rate (:func:`paired_by_seed`); None without two common seeds."""
    records = study.records() if records is None else records
    table = study.table("A", records)
    return paired_by_seed(*(runs_by_seed(table, name, study.chosen_lr(records, name), value) for name in (model, other)))


def seed_spread(study: Study, records=None, value: str = "test_accuracy_ema") -> dict | None:
    """How far runs that differ only in their seed move, pooled over part A's models at their chosen
    rates: ``run`` is the standard deviation of one run's accuracy, ``gap`` that of the paired gap
    between the first model (the equivariant one) and each other model; each with its degrees of
    freedom (pooled variance Σ(nᵢ − 1)·sᵢ² / Σ(nᵢ − 1)) and the 95 % half-width ``t·sd`` that one new
    run, or one new single-seed gap, falls within. None without two seeds of some model.

    This is the spread a single run's binomial interval leaves out: the seed draws the training subset,
    the 2,000-image test subset, the initialisation, the batches and the noise, so runs at different
    seeds differ in all of them (runs paired by seed share every one)."""
    records = study.records() if records is None else records
    table = study.table("A", records)
    if table.empty:
        return None
    by_model = {model: runs_by_seed(table, model, study.chosen_lr(records, model), value) for model in study.spec["models"]}
    first, *others = study.spec["models"]
    gaps = [[by_model[first][s] - by_model[other][s] for s in sorted(set(by_model[first]) & set(by_model[other]))]
            for other in others]

    def pooled(groups) -> dict | None:
        groups = [np.asarray(g, dtype=float) for g in groups if len(g) >= 2]
        df = sum(len(g) - 1 for g in groups)
        if not df:
            return None
        sd = float(np.sqrt(sum((len(g) - 1) * g.var(ddof=1) for g in groups) / df))
        return {"sd": sd, "df": df, "ci95": float(stats.t.ppf(0.975, df) * sd)}

    run = pooled([list(runs.values()) for runs in by_model.values()])
    return None if run is None else {"run": run, "gap": pooled(gaps)}



def seed_spread_sentence(study: Study, records=None) -> str:
    """What a one-seed table's binomial ± leaves out, in one sentence (the README under part C,
    notebook 06 under part E): how far seeds move one run and one gap, from :func:`seed_spread`."""
    spread = seed_spread(study, records)
    if not spread:
        return "± in a one-seed table is binomial (the test set's sampling error); no part-A seeds measure how far seeds move a run."
    gap = spread["gap"]
    return (f"± in the one-seed tables (C, E) is binomial: the test set's sampling error only. Seeds move a run by "
            f"more: pooled over part A's models, one run's seed-to-seed SD is {100 * spread['run']['sd']:.1f} points "
            f"({spread['run']['df']} df; a new run falls within ±{100 * spread['run']['ci95']:.1f} points of the mean)"
            + (f", and a difference between two one-seed rows within ±{100 * gap['ci95']:.1f} points (pooled SD of part "
               f"A's paired gaps {100 * gap['sd']:.1f} points, {gap['df']} df)." if gap else "."))

def grid_edge_sentence(study: Study, records=None) -> str:
    """Which chosen learning rates sit at an end of their grid (:meth:`Study.grids`): there a better
    rate may lie beyond the grid, so that model's accuracy may be understated. Empty before any choice."""
    records = study.records() if records is None else records
    grids = [g for g in study.grids(records) if g["chosen"] is not None]
    if not grids:
        return ""
    edges = [f"{MODEL_LABELS.get(g['model'], g['model'])} in part {g['part']}"
             + (" non-private" if g["non_private"] else "") + (f" at {g['steps']} steps" if g["steps"] else "")
             + f", lr {g['chosen']:g} (the {'smallest' if g['chosen'] == g['rates'][0] else 'largest'} of "
             + ", ".join(f"{r:g}" for r in g["rates"]) + ")"
             for g in grids if g["chosen"] in (g["rates"][0], g["rates"][-1])]
    if not edges:
        return f"Every chosen learning rate ({len(grids)} grids) lies inside its grid."
    return (f"Learning rates chosen at an end of their grid, where a better rate may lie beyond it (so that model's "
            f"accuracy may be understated): {'; '.join(edges)}. The other {len(grids) - len(edges)} chosen rates lie "
            "inside their grids.")


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


def provenance_sentence(records: list[dict]) -> str:
    """What the records say about the code and the machine that made them, counted: a record without
    ``source_sha256`` names, as ``git_commit``, the checkout when it was written, which may be later
    than the code that trained it; a record without ``machine`` does not say which CPU it ran on."""
    from collections import Counter

    no_hash = sum(1 for r in records if not r.get("source_sha256"))
    named = Counter(r["machine"]["cpu"] for r in records if r.get("machine"))
    return (f"**Provenance.** {no_hash} of these {len(records)} records carry no source hash (they were written before "
            "records had one): their `git_commit` names the checkout when each was written, which may be later than "
            f"the code that trained it; the other {len(records) - no_hash} name their code by `source_sha256`. "
            + (f"{len(records) - sum(named.values())} do not name the CPU they ran on" if len(named) < len(records) else "")
            + ("; " if named and len(named) < len(records) else "")
            + (", ".join(f"{n} ran on {cpu}" for cpu, n in named.most_common()) if named else "")
            + ". A run repeats bit for bit only with the same code on the same kind of CPU; elsewhere it lands within "
              "the seed-to-seed spread (`python -m dpeq_utils verify`).")
