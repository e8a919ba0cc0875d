"""Each part's figure, and the overview the README shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..plotting import MODEL_LABELS as MODEL_NAMES
from ..study import Study
from .stats import STAMP, binomial_ci95
from .tables import part_a, part_b, part_c, part_d

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
    from ..plotting import MODEL_COLOURS

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
    from ..plotting import MODEL_COLOURS

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
    """Part D: EMA test accuracy (or another history value) along training for each model and run
    length: colour per model, line style and marker per length (so that a short run drawn over a
    long one stays visible), the models set a little apart on the step axis; an accuracy's last point
    carries its test-sampling interval (binomial, 95 %)."""
    from ..plotting import MODEL_COLOURS
    from .stats import binomial_ci95

    d = part_d(study, records)
    lengths = sorted(d["length"].unique()) if len(d) else []
    styles = dict(zip(reversed(lengths), (("-", "o"), ("--", "^"), (":", "s"), ("-.", "D"))))
    models = list(dict.fromkeys(d["model"])) if len(d) else []
    shift = 0.012 * (max(lengths) if lengths else 0)
    for (model, length), part in d.groupby(["model", "length"], sort=False) if len(d) else []:
        linestyle, marker = styles.get(length, ("-", "o"))
        # every (model, length) a little apart on the step axis: runs evaluated at the same step stay visible
        slot = models.index(model) * len(lengths) + lengths.index(length)
        steps = part["step"] + (slot - (len(models) * len(lengths) - 1) / 2) * shift / 2
        ax.plot(steps, part[value], marker=marker, linestyle=linestyle, color=MODEL_COLOURS.get(model), markersize=4,
                label=f"{MODEL_NAMES.get(model, model)}, {length} steps")
        if "accuracy" in value and study.base.test_size:
            last = part[value].iloc[-1]
            ax.errorbar(steps.iloc[-1], last, yerr=binomial_ci95(last, study.base.test_size),
                        color=MODEL_COLOURS.get(model), capsize=3, linestyle="none")
    if len(d):
        if "accuracy" in value:
            ax.axhline(0.1, color="grey", linestyle=":", linewidth=1)
        ax.legend(fontsize=6)
    readable = {"test_accuracy_ema": "test accuracy (EMA weights)", "test_loss_ema": "test loss (EMA weights)",
                "test_accuracy": "test accuracy (raw weights)", "test_loss": "test loss (raw weights)"}
    ax.set(xlabel="logical step", ylabel=readable.get(value, value.replace("_", " ")),
           title=f"D · training length, σ per length ({study.profile})"
                 + ("; bar: test-sampling 95 %" if "accuracy" in value and len(d) else ""))
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


def plot_f(ax, study: Study, records=None) -> None:
    """Part F: each seed's EMA test accuracy at the long length, at ε and without privacy, per model
    (each at its rate chosen at that length); a bar marks the mean of two or more seeds."""
    from ..plotting import MODEL_COLOURS
    from .noise_limited import part_f

    f = part_f(study, records)
    for i, model in enumerate(f.get("models", ())):
        for j, (label, values) in enumerate((("ε", f["private"][model]), ("non-private", f["non_private"][model]))):
            x = 3 * i + j
            ax.scatter([x] * len(values), list(values.values()), color=MODEL_COLOURS.get(model), alpha=0.8,
                       marker="o" if j == 0 else "s")
            if len(values) > 1:
                ax.hlines(np.mean(list(values.values())), x - 0.3, x + 0.3, color=MODEL_COLOURS.get(model))
    if f:
        eps = f"ε = {study.base.target_epsilon:g}"
        ax.set_xticks([0, 1, 3, 4], [eps, "non-private"] * 2)
        ax.set_xlim(-0.7, 4.7)
        low, high = ax.get_ylim()
        ax.set_ylim(low, high + 0.15 * (high - low))  # room for the names above the points
        for i, model in enumerate(f["models"]):  # the model's name over its pair of columns
            ax.text(3 * i + 0.5, 0.97, MODEL_NAMES.get(model, model), transform=ax.get_xaxis_transform(),
                    ha="center", va="top", fontsize=8, color=MODEL_COLOURS.get(model))
    ax.set(ylabel="test accuracy (EMA), one point per seed",
           title=f"F · {f.get('steps', '')} steps ({study.profile})")
    _no_records(ax)
    stamp(ax, study)


def shipped_reference(profile: str) -> Study | None:
    """The teach study to show beside a smoke run (None under any other profile)."""
    return Study("teach") if Path(profile).stem == "smoke" else None


def part_c_by_order(study: Study, records=None):
    """Part C's table sorted by the group's order ``|G|`` (column ``order``), the paper's D4 followed by
    its two design ablations (no restriction, then the global head)."""
    from ..equivariance import group_order

    c = part_c(study, records)
    if c.empty:
        return c
    c = c.assign(order=[group_order(g) for g in c["group"]],
                 design=[2 if "global" in lab else 1 if "without" in lab else 0 for lab in c["label"]])
    return c.sort_values(["order", "design"], kind="stable").drop(columns="design").reset_index(drop=True)


def plot_c_by_order(ax, study: Study, records=None) -> None:
    """Part C sorted by the group's order |G| (:func:`part_c_by_order`): EMA test accuracy of each
    one-seed run with ± the one-run seed spread pooled over part A (:func:`.tables.seed_spread`: where
    the variant's mean over seeds lies, 95 %), or the binomial interval when no seeds measure that
    spread (the axis label says which)."""
    from .tables import seed_spread

    records = study.records() if records is None else records
    c = part_c_by_order(study, records)
    spread = seed_spread(study, records)
    if len(c):
        acc = c["test_accuracy_ema"].astype(float)
        half = ([spread["run"]["ci95"]] * len(c) if spread else binomial_ci95(acc, c["test_size"].astype(float)))
        y = np.arange(len(c))
        ax.barh(y, acc, xerr=half, capsize=3, color=["#1b7837" if "paper" in lab else "#7fbf7b" for lab in c["label"]])
        ax.set_yticks(y, [f"|G| = {n}: {lab} ({p:,} params)" for n, lab, p in zip(c["order"], c["label"], c["num_params"])],
                      fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0.1, color="grey", linestyle=":")
    ax.set_xlim(left=0)
    basis = (f"± one run's seed spread, pooled over part A ({spread['run']['df']} df)" if spread
             else "± binomial (no seeds measure the spread)")
    ax.set(xlabel=f"test accuracy (EMA), one seed each\n{basis}", title=f"C · which symmetry, by group order ({study.profile})")
    _no_records(ax)
    stamp(ax, study)
