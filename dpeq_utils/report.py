"""Tables and figures of the evidence study (:mod:`dpeq_utils.study`), shared by the notebooks and
the README's *Results* section, so both show the same numbers from the same records.

Uncertainty: runs that differ only in their seed (training subset, initialisation, batches,
noise) are summarised as mean ± sample standard deviation with a 95 % Student-t interval for the
mean; a single run gets the binomial standard error of its test accuracy instead (the test subset's
sampling error, not the seed-to-seed spread).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .plotting import MODEL_LABELS as MODEL_NAMES
from .reference import paper_claims
from .study import Study

STAMP = "pipeline check on tiny synthetic data: not a result"


def t_quantile(runs: int) -> float:
    """The 97.5 % quantile of Student's t with ``runs - 1`` degrees of freedom.

    >>> round(t_quantile(3), 3), round(t_quantile(2), 2)
    (4.303, 12.71)
    """
    from scipy import stats

    return float(stats.t.ppf(0.975, runs - 1))


def summarise(table: pd.DataFrame, by: list[str], value: str = "test_accuracy_ema") -> pd.DataFrame:
    """Mean, std, runs and the 95 % interval's half-width of ``value`` per group of ``by``."""
    rows = []
    for keys, part in table.groupby(by, sort=False, dropna=False):
        values = part[value].astype(float).to_numpy()
        n = len(values)
        mean = float(values.mean())
        if n > 1:
            std = float(values.std(ddof=1))
            half = t_quantile(n) * std / math.sqrt(n)
        else:  # one run: the test subset's binomial standard error
            size = float(part["test_size"].iloc[0])
            std = math.sqrt(max(mean * (1 - mean), 0.0) / size)
            half = float(binomial_ci95(mean, size))
        row = dict(zip(by, keys if isinstance(keys, tuple) else (keys,)))
        row.update({"mean": mean, "std": std, "runs": n, "ci95": half})
        rows.append(row)
    return pd.DataFrame(rows)


def percent(mean: float, half: float | None = None) -> str:
    """``'31.2 %'`` or ``'31.2 ± 1.4 %'``.

    >>> percent(0.3124, 0.0141)
    '31.2 ± 1.4 %'
    """
    return f"{100 * mean:.1f} %" if half is None else f"{100 * mean:.1f} ± {100 * half:.1f} %"


# ---------------------------------------------------------------------------------------------- cost


#: Config fields that set the arithmetic of a step (not ε, seed or learning rate, which do not change its cost).
COST_FIELDS = ("dataset", "model", "group", "restrict", "head", "widths", "num_groups", "aug_mult", "batch_size",
               "physical_batch_size", "non_private", "prune_rate", "drop_rate", "modelmix", "device")


def step_seconds(records: dict[str, dict]) -> dict[tuple, float]:
    """Training-loop seconds per logical step: the fastest of every record with the same arithmetic
    (:data:`COST_FIELDS`). The fastest, because sharing the machine with other work only ever slows a
    run down: the minimum is the closest to the cost on an idle machine."""
    times: dict[tuple, list[float]] = {}
    for record in records.values():
        key = _cost_key(record["config"], record["device"])
        times.setdefault(key, []).append(record["train_time_s"] / record["steps"])
    return {key: float(min(values)) for key, values in times.items()}


def _cost_key(config: dict, device: str) -> tuple:
    values = {**config, "device": device}
    return tuple(tuple(values[f]) if isinstance(values[f], list) else values[f] for f in COST_FIELDS)


def typical_step_seconds(record: dict, records: dict[str, dict]) -> float:
    return step_seconds(records)[_cost_key(record["config"], record["device"])]


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
    diff = np.array([picks[model][s] - picks[other][s] for s in common])
    half = t_quantile(len(diff)) * diff.std(ddof=1) / math.sqrt(len(diff))
    return {"mean": float(diff.mean()), "ci95": float(half), "seeds": len(diff)}


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


# ---------------------------------------------------------------------------------------------- figures


def _no_records(ax, missing: int = 0) -> None:
    if not ax.has_data():
        ax.text(0.5, 0.5, "no records yet" + (f" ({missing} runs missing)" if missing else ""), ha="center",
                va="center", transform=ax.transAxes)


def stamp(ax, study: Study) -> None:
    """Mark an axis as a smoke-profile pipeline check."""
    if study.profile == "smoke":
        ax.set_title(f"{ax.get_title()}\n[{STAMP}]", fontsize=9, color="firebrick")


def plot_a(ax, study: Study, records=None) -> None:
    """Part A: EMA test accuracy per model at its chosen rate, 95 % interval over seeds."""
    from .plotting import MODEL_COLOURS

    _, summary = part_a(study, records)
    if len(summary):
        y = np.arange(len(summary))
        ax.barh(y, summary["test accuracy (EMA)"], xerr=summary["EMA ± (95 %)"], capsize=3,
                color=[MODEL_COLOURS.get(m, "grey") for m in summary["model"]])
        ax.set_yticks(y, [f"{MODEL_NAMES.get(m, m)}\n{p:,} params, lr {lr:g}, {n} seed(s)" for m, p, lr, n in
                          zip(summary["model"], summary["parameters"], summary["lr"], summary["seeds"])], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0.1, color="grey", linestyle=":", label="chance")
    ax.set_xlim(left=0)
    ax.set(xlabel="test accuracy (EMA), 95 % interval",
           title=f"A · equal budget, ε = {study.base.target_epsilon:g} ({study.profile})")
    _no_records(ax)
    stamp(ax, study)


def plot_b(ax, study: Study, records=None) -> None:
    """Part B: EMA test accuracy against ε, mean and 95 % interval; dashed: non-private (own rate)."""
    from .plotting import MODEL_COLOURS

    b = part_b(study, records)
    for model, part in b.groupby("model", sort=False) if len(b) else []:
        finite = part[np.isfinite(part["epsilon"])]
        colour = MODEL_COLOURS.get(model)
        ax.errorbar(finite["epsilon"], finite["mean"], yerr=finite["ci95"], marker="o", capsize=3, color=colour,
                    label=f"{MODEL_NAMES.get(model, model)} ({int(finite['runs'].min())}+ seeds)")
        reference = part[~np.isfinite(part["epsilon"])]
        if len(reference):
            ax.axhspan(reference["mean"].iloc[0] - reference["ci95"].iloc[0],
                       reference["mean"].iloc[0] + reference["ci95"].iloc[0], color=colour, alpha=0.12)
            ax.axhline(reference["mean"].iloc[0], color=colour, linestyle="--", linewidth=1,
                       label=f"{MODEL_NAMES.get(model, model)}, non-private")
    if len(b):
        ax.axhline(0.1, color="grey", linestyle=":", label="chance")
        ax.legend(fontsize=6)
    ax.set(xlabel=f"ε (δ = {study.base.target_delta:g})", ylabel="test accuracy (EMA)",
           title=f"B · accuracy against ε ({study.profile})")
    _no_records(ax)
    stamp(ax, study)


def plot_c(ax, study: Study, records=None) -> None:
    """Part C: EMA test accuracy per group and design ablation (one seed: binomial 95 % interval)."""
    c = part_c(study, records)
    if len(c):
        acc = c["test_accuracy_ema"].astype(float)
        half = binomial_ci95(acc, c["test_size"].astype(float))
        y = np.arange(len(c))
        ax.barh(y, acc, xerr=half, capsize=3, color=["#1b7837" if "paper" in lab else "#7fbf7b" for lab in c["label"]])
        ax.set_yticks(y, [f"{lab} ({n:,} params)" for lab, n in zip(c["label"], c["num_params"])], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0.1, color="grey", linestyle=":")
    ax.set_xlim(left=0)
    ax.set(xlabel="test accuracy (EMA), 95 % binomial interval", title=f"C · which symmetry ({study.profile})")
    _no_records(ax)
    stamp(ax, study)


def plot_d(ax, study: Study, records=None, value: str = "test_accuracy_ema") -> None:
    """Part D: EMA test accuracy (or another history value) along training for each model and run length."""
    from .plotting import MODEL_COLOURS

    d = part_d(study, records)
    for (model, length), part in d.groupby(["model", "length"], sort=False) if len(d) else []:
        ax.plot(part["step"], part[value], marker="o", color=MODEL_COLOURS.get(model),
                alpha=0.4 + 0.6 * (length == d["length"].max()), label=f"{MODEL_NAMES.get(model, model)}, {length} steps")
    if len(d):
        if "accuracy" in value:
            ax.axhline(0.1, color="grey", linestyle=":")
        ax.legend(fontsize=6)
    ax.set(xlabel="logical step", ylabel=value.replace("_", " ").replace("ema", "(EMA)"),
           title=f"D · training length, σ per length ({study.profile})")
    _no_records(ax)
    stamp(ax, study)


def figure_overview(study: Study, records=None, title: str | None = None):
    """The main answers in one figure: parts A, B and D."""
    import matplotlib.pyplot as plt

    records = study.records() if records is None else records
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for plot, ax in zip((plot_a, plot_b, plot_d), axes):
        plot(ax, study, records)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def side_by_side(plot, study: Study, reference: Study | None, records=None, width: float = 6.5, height: float = 3.8):
    """``plot`` for ``study``, and beside it for ``reference`` (the shipped study) when one is given."""
    import matplotlib.pyplot as plt

    panels = [study] if reference is None else [study, reference]
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), squeeze=False)
    for ax, which in zip(axes[0], panels):
        plot(ax, which, records if which is study else None)
    fig.tight_layout()
    return fig


def shipped_reference(profile: str) -> Study | None:
    """The teach study to show beside a smoke run (None under any other profile)."""
    return Study("teach") if Path(profile).stem == "smoke" else None


# ---------------------------------------------------------------------------------------------- README


RESULTS_BEGIN = "<!-- results:begin (generated by python -m dpeq_utils.report; do not edit by hand) -->"
RESULTS_END = "<!-- results:end -->"


def results_markdown(study: Study, records=None) -> str:
    """The README's generated block: every part's table, from the records that exist."""
    records = study.records() if records is None else records
    b = study.base
    keys = {k for part in PARTS_WITH_TABLES for k in study.table(part, records).get("key", [])}
    missing = study.missing(records=records)
    _, waiting = study.plan(records)
    waiting = sorted(set(waiting))
    parts = sorted({m.part for m in missing} | {w.split(":")[0].split()[-1] for w in waiting})
    state = ("complete" if not (missing or waiting) else
             f"{len(missing)} planned runs still missing" + (f", {len(waiting)} more wait for a learning rate to be "
                                                            "chosen" if waiting else "")
             + "; parts " + ", ".join(parts) + " incomplete")
    epochs = b.update_steps * b.batch_size / b.train_size
    lines = [f"Generated from {len(keys)} run records in `data/reference/{study.profile}/` ({state}). "
             f"Budget of every run: {b.dataset}, {b.train_size:,} training examples (a seeded subset), "
             f"ε = {b.target_epsilon:g} unless stated, δ = {b.target_delta:g} (RDP), Poisson batch {b.batch_size}, "
             f"{b.update_steps} steps (~{epochs:.1f} epochs), clip {b.clip_norm:g}, no augmentation, EMA {b.ema_decay:g}; "
             f"learning rate per model chosen on {b.validation_size:,} validation examples held out of the training set; "
             f"test accuracy on {b.test_size:,} test images. ± is a 95 % interval: "
             "Student-t over seeds, or 1.96 binomial standard errors for a single run. Seconds per step: the fastest "
             "training loop among the runs with the same arithmetic (runs sometimes shared the CPU with other work, "
             "which only slows them).", "", "**Verdicts at this scale** (each computed from the records below):", ""]
    lines += [f"* {line}" for line in verdicts(study, records)]
    lines.append("")
    _, summary = part_a(study, records)
    lines += ["**A · Equal budget, different models**", "",
              "| model | parameters | lr (chosen) | seeds | test accuracy | test accuracy (EMA) | s per step (2-core CPU) |",
              "|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        lines.append(f"| {MODEL_NAMES.get(r['model'], r['model'])} | {r['parameters']:,} | {r['lr']:g} | {r['seeds']} | "
                     f"{percent(r['test accuracy'], r['± (95 %)'])} | {percent(r['test accuracy (EMA)'], r['EMA ± (95 %)'])} | "
                     f"{r['s per step']:.2f} |")
    gap = paired_gap(study, "eq_resnet9", "resnet9_matched", records)
    if gap is not None:
        lines += ["", f"Paired on {gap['seeds']} seeds, equivariant minus parameter-matched (EMA): "
                      f"{100 * gap['mean']:+.1f} ± {100 * gap['ci95']:.1f} points."]
    table_b = part_b(study, records)
    if len(table_b):
        eps = sorted(table_b["epsilon"].unique())
        lines += ["", "**B · Test accuracy (EMA) against ε** (each model at its own rate; non-private with its own rate)", "",
                  "| model | " + " | ".join("non-private" if not np.isfinite(e) else f"ε = {e:g}" for e in eps) + " |",
                  "|---|" + "---|" * len(eps)]
        for model, part in table_b.groupby("model", sort=False):
            cells = []
            for e in eps:
                row = part[part["epsilon"] == e]
                cells.append(f"{percent(row['mean'].iloc[0], row['ci95'].iloc[0])} ({int(row['runs'].iloc[0])})" if len(row) else "—")
            lines.append(f"| {MODEL_NAMES.get(model, model)} | " + " | ".join(cells) + " |")
        lines += ["", "(n): seeds."]
    table_c = part_c(study, records)
    if len(table_c):
        lines += ["", "**C · Which symmetry** (equivariant ResNet-9, one seed)", ""]
        lines += _single_runs_table(table_c, records, "variant", "num_params", "parameters")
    curves = part_d(study, records)
    if len(curves):
        finals = curves[curves["step"] == curves["length"]]
        lines += ["", "**D · Training length** (seed 0, σ calibrated per length; EMA test accuracy at the end)", "",
                  "| model | " + " | ".join(f"{n} steps" for n in sorted(finals["length"].unique())) + " |",
                  "|---|" + "---|" * finals["length"].nunique()]
        for model, part in finals.groupby("model", sort=False):
            by = part.set_index("length")["test_accuracy_ema"]
            lines.append(f"| {MODEL_NAMES.get(model, model)} | " + " | ".join(
                percent(by[n]) if n in by.index else "—" for n in sorted(finals["length"].unique())) + " |")
    table_e = study.table("E", records)
    if len(table_e):
        lines += ["", "**E · Other ways of making DP-SGD work, same budget** (one seed; baselines at their profile's rates)", ""]
        lines += _single_runs_table(table_e, records, "method", "kept_params", "trained parameters")
    compute = recipe_compute(study, records)
    if len(compute) == 2:
        ratio = compute["CPU hours (2 cores)"].iloc[0] / compute["CPU hours (2 cores)"].iloc[1]
        lines += ["", "**Compute of the published recipes** (example-view gradients × the cost of one, measured for each "
                      f"model with its recipe's views in one benchmark run on {compute['machine'].iloc[0]}; "
                      f"the paper claims {paper_claims()['compute']['claim']})", "",
                  "| recipe | steps × batch × views | example-view gradients | ms each (this CPU) | CPU hours (2 cores) |",
                  "|---|---|---|---|---|"]
        for _, r in compute.iterrows():
            lines.append(f"| {r['recipe']} | {r['steps']:,} × {r['batch']:,} × {r['views']} | {r['example-view gradients'] / 1e6:.1f} M | "
                         f"{r['ms per example-view (this CPU)']:.1f} | {r['CPU hours (2 cores)']:,.0f} |")
        lines += ["", f"The paper's recipe costs {100 * ratio:.0f} % of De et al.'s ε = 8 recipe on this CPU "
                      f"({100 * (1 - ratio):.0f} % less)."]
    return "\n".join(lines)


PARTS_WITH_TABLES = ("A", "B", "C", "D", "E")


def verdicts(study: Study, records=None) -> list[str]:
    """One sentence per claim of the paper, computed from the records (nothing here is typed by hand)."""
    from .models import WideResNet, build_model, count_params

    records = study.records() if records is None else records
    lines = []
    gap = paired_gap(study, "eq_resnet9", "resnet9_matched", records)
    if gap is not None:
        verdict = ("higher than" if gap["mean"] - gap["ci95"] > 0 else "lower than" if gap["mean"] + gap["ci95"] < 0
                   else "not distinguishable from")
        lines.append(f"**Accuracy at equal budget and equal parameters** (A): the equivariant ResNet-9 is **{verdict}** "
                     f"the plain ResNet-9 with the same parameter count: {100 * gap['mean']:+.1f} ± {100 * gap['ci95']:.1f} "
                     f"points (EMA test accuracy, paired over {gap['seeds']} seeds, ε = {study.base.target_epsilon:g}).")
    table_b = part_b(study, records)
    if len(table_b) and {"eq_resnet9", "resnet9_matched"} <= set(table_b["model"]):
        wide = table_b.pivot(index="epsilon", columns="model", values="mean").dropna()
        half = table_b.pivot(index="epsilon", columns="model", values="ci95").reindex(wide.index)
        private = wide[np.isfinite(wide.index)]
        below = int(((private["eq_resnet9"] + half.loc[private.index, "eq_resnet9"])
                     < (private["resnet9_matched"] - half.loc[private.index, "resnet9_matched"])).sum())
        above = int(((private["eq_resnet9"] - half.loc[private.index, "eq_resnet9"])
                     > (private["resnet9_matched"] + half.loc[private.index, "resnet9_matched"])).sum())
        lines.append(f"**Across ε** (B): of {len(private)} values of ε with records for both models, the equivariant model is "
                     f"below the matched one beyond both intervals at {below}, above at {above}, and within the intervals "
                     f"at {len(private) - below - above}."
                     + (f" Without privacy (each at its own rate): {percent(wide.loc[np.inf, 'eq_resnet9'])} against "
                        f"{percent(wide.loc[np.inf, 'resnet9_matched'])}." if np.inf in wide.index else ""))
    curves = part_d(study, records)
    if len(curves):
        finals = curves[curves["step"] == curves["length"]].pivot(index="length", columns="model", values="test_accuracy_ema")
        if {"eq_resnet9", "resnet9_matched"} <= set(finals.columns):
            finals = finals.dropna()
            lines.append("**Training length** (D, one seed): equivariant minus matched at the end of a run of "
                         + ", ".join(f"{n} steps: {100 * (r['eq_resnet9'] - r['resnet9_matched']):+.1f} points"
                                     for n, r in finals.iterrows()) + ".")
    paper = count_params(build_model("eq_resnet9"))
    wrn40, wrn16 = count_params(WideResNet(depth=40, width=4)), count_params(WideResNet(depth=16, width=4))
    lines.append(f"**Parameters:** the paper model has {paper:,}; De et al.'s headline WRN-40-4 has {wrn40:,} "
                 f"({wrn40 / paper:.1f}× more: the paper's \"~{paper_claims()['parameters']['value']:g}× fewer\" is this "
                 f"ratio) and WRN-16-4 {wrn16:,} "
                 f"({wrn16 / paper:.1f}×). Counted with `count_params`.")
    compute = recipe_compute(study, records)
    if len(compute) == 2:
        ratio = compute["CPU hours (2 cores)"].iloc[0] / compute["CPU hours (2 cores)"].iloc[1]
        lines.append(f"**Compute:** the paper's recipe costs {100 * ratio:.0f} % of De et al.'s ε = 8 WRN-16-4 recipe "
                     f"on this CPU ({100 * (1 - ratio):.0f} % less; the paper claims {paper_claims()['compute']['claim']}).")
    else:
        lines.append("**Compute:** not compared yet. The earlier figure mixed study runs that shared the CPU and ran at "
                     "different commits; the comparison now waits for one benchmark run of both recipes' models with "
                     "their views on an idle machine (`benchmarks/per_sample_speed.py --compute-record "
                     "data/reference/benchmark/compute.json`).")
    return lines


def binomial_ci95(accuracy, size):
    """Half-width of the 95 % normal-approximation interval of an accuracy measured on ``size`` examples."""
    return 1.96 * np.sqrt(accuracy * (1 - accuracy) / size)


def _single_runs_table(table: pd.DataFrame, records: dict, name: str, params: str, params_header: str) -> list[str]:
    """Markdown rows of one-seed runs: label, parameters, EMA test accuracy ± binomial interval, s per step."""
    lines = [f"| {name} | {params_header} | test accuracy (EMA) | s per step |", "|---|---|---|---|"]
    for _, r in table.iterrows():
        acc = float(r["test_accuracy_ema"])
        lines.append(f"| {r['label']} | {int(r[params]):,} | {percent(acc, binomial_ci95(acc, float(r['test_size'])))} | "
                     f"{typical_step_seconds(records[r['key']], records):.2f} |")
    return lines


def recipe_compute(study: Study | None = None, records=None) -> pd.DataFrame:
    """Compute of the published recipes (the paper's run; De et al.'s ε = 8 setting, both from the
    ``paper`` profile): their example-view gradients times the cost of one, as measured for each
    recipe's model *with its views* in one benchmark run on an idle machine
    (``data/reference/benchmark/compute.json``, written by ``benchmarks/per_sample_speed.py
    --compute-record``). Empty until that file exists: study runs shared the CPU with other work and
    ran at other commits, so their timings are not used for this comparison."""
    import json

    from .benchmark import COMPUTE_RECORD
    from .paths import reference_dir
    from .shipped import verify_shipped

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
                     "machine": measured["device"]})
    return pd.DataFrame(rows)


def update_readme(readme: Path, block: str) -> bool:
    """Replace the generated block of ``readme``; True if it changed."""
    text = readme.read_text()
    pattern = re.compile(re.escape(RESULTS_BEGIN) + ".*?" + re.escape(RESULTS_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no generated results block ({RESULTS_BEGIN} … {RESULTS_END})")
    new = pattern.sub(lambda _: f"{RESULTS_BEGIN}\n{block}\n{RESULTS_END}", text)
    if new != text:
        readme.write_text(new)
    return new != text


def main(argv=None) -> int:
    import argparse

    from .paths import REPO_ROOT
    from .plotting import savefig, set_theme

    parser = argparse.ArgumentParser(prog="python -m dpeq_utils.report",
                                     description="Rebuild the README's results block and figure from the shipped records.")
    parser.add_argument("--profile", default="teach")
    parser.add_argument("--check", action="store_true", help="only check that the README is up to date (exit 1 if not)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of foreseeable errors too")
    args = parser.parse_args(argv)
    from .cli import user_errors

    with user_errors(parser.prog, args.debug):  # a bad record or profile: one sentence, no traceback
        study = Study(args.profile)
        block = results_markdown(study)
        readme = REPO_ROOT / "README.md"
        if args.check:
            current = readme.read_text()
            ok = f"{RESULTS_BEGIN}\n{block}\n{RESULTS_END}" in current
            print("README results block is up to date" if ok else
                  "README results block is stale: run python -m dpeq_utils.report")
            return 0 if ok else 1
        set_theme()
        fig = figure_overview(study, title=f"dpeq evidence study ({args.profile} profile, CIFAR-10, 2-core CPU scale)")
        savefig(fig, "results_overview", "results")
        print(block)
        print("README updated" if update_readme(readme, block) else "README unchanged")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
