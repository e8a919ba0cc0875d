"""Signal and noise along part D's longest runs (:meth:`dpeq_utils.study.Study.mechanism`): the
table, the figure and the sentences notebook 03 shows, computed from the mechanism records."""

from __future__ import annotations

import math

import pandas as pd

from ..plotting import MODEL_LABELS as MODEL_NAMES
from ..study import Study


def along_training(study: Study, records: dict[str, dict] | None = None, train_missing: bool | None = False,
                   echo=print) -> tuple[pd.DataFrame, dict[str, dict]]:
    """One row per model and measured step (the study's part-D models), and the records by model;
    models without a record (and not measured now, as ``train_missing`` says) are absent."""
    records = study.records() if records is None else records
    found = {}
    for model in study.spec["epsilon_models"]:
        record = study.mechanism(model, records, train_missing=train_missing, echo=echo)
        if record is not None:
            found[model] = record
    rows = [{"model": model, "step": p["step"], "ε spent": p["epsilon"], "median gradient norm": p["median gradient norm"],
             "clipped": p["clipped"], "mean cosine": p["mean_cosine"], "signal norm": p["signal_norm"],
             "signal, lowest probe": min(p["signal_norm_probes"]), "signal, highest probe": max(p["signal_norm_probes"]),
             "noise norm": p["noise_norm"], "noise ÷ signal": p["noise_to_signal"]}
            for model, record in found.items() for p in record["points"]]
    return pd.DataFrame(rows), found


def plot_along_training(axes, table: pd.DataFrame, study: Study) -> None:
    """Left: the averaged clipped signal's length (band: the lowest and highest probe); right: one
    step's noise over it (log scale)."""
    from ..plotting import MODEL_COLOURS
    from .figures import stamp

    for model, part in table.groupby("model", sort=False):
        colour = MODEL_COLOURS.get(model)
        label = MODEL_NAMES.get(model, model)
        axes[0].plot(part["step"], part["signal norm"], marker="o", color=colour, label=label)
        axes[0].fill_between(part["step"], part["signal, lowest probe"].clip(lower=0), part["signal, highest probe"],
                             color=colour, alpha=0.2)
        finite = part[part["noise ÷ signal"].map(lambda v: v is not None and math.isfinite(v))]
        axes[1].plot(finite["step"], finite["noise ÷ signal"], marker="o", color=colour, label=label)
    axes[0].set(xlabel="logical step", ylabel="‖mean clipped gradient‖", title=f"{study.profile}: the signal")
    axes[1].set(xlabel="logical step", ylabel="noise norm ÷ signal norm", yscale="log",
                title=f"{study.profile}: noise over signal")
    axes[0].legend(fontsize=7)
    for ax in axes:
        stamp(ax, study)


def along_training_findings(table: pd.DataFrame, found: dict[str, dict], records: dict[str, dict]) -> str:
    """What the measurements say, per model and between the two models, as markdown; every number is
    read from ``table`` and the records."""
    if table.empty:
        return ""
    lines = []
    for model, part in table.groupby("model", sort=False):
        first, last = part.iloc[0], part.iloc[-1]
        record = found[model]
        trained = records.get(record["run_key"])
        same = (trained is not None and trained["test_accuracy"] == record["test_accuracy"]
                and trained["test_accuracy_ema"] == record["test_accuracy_ema"])
        lines.append(
            f"* **{MODEL_NAMES.get(model, model)}** (σ = {record['noise_multiplier']:.3f} for {record['steps_trained']} "
            f"steps): the signal's length goes from {first['signal norm']:.3g} at step {first['step']} to "
            f"{last['signal norm']:.3g} at step {last['step']}, the mean pairwise cosine from {first['mean cosine']:.4f} to "
            f"{last['mean cosine']:.4f}, and one step's noise from {_times(first['noise ÷ signal'])} to "
            f"{_times(last['noise ÷ signal'])} the signal; the signal is longest at step "
            f"{part.loc[part['signal norm'].idxmax(), 'step']}." + _unresolved(record) + " The measured run ends at "
            f"{record['test_accuracy_ema']:.1%} EMA "
            "test accuracy; " + ("part D's record of the same run: the same (it is that run)." if same else
                                 "part D's record of the same config: "
                                 + (f"{trained['test_accuracy_ema']:.1%} (not bit-identical: that record was trained by "
                                    f"the code of commit {_short(trained.get('git_commit'))}, this measurement by "
                                    f"{_short(record.get('git_commit'))})." if trained is not None else "not there.")))
        ratios = part["noise ÷ signal"].astype(float)
        if ratios.notna().any():
            lowest = part.loc[ratios.idxmin()]
            lines[-1] += (f" Its noise-to-signal ratio is lowest at step {lowest['step']} "
                          f"({_times(lowest['noise ÷ signal'])}), where a step carries the most signal per unit of noise.")
    pair = table.pivot(index="step", columns="model", values="noise ÷ signal")
    if {"eq_resnet9", "resnet9_matched"} <= set(pair.columns):
        both = pair[["eq_resnet9", "resnet9_matched"]].dropna()
        lower = int((both["eq_resnet9"] < both["resnet9_matched"]).sum())
        eq_end, matched_end = found["eq_resnet9"]["test_accuracy_ema"], found["resnet9_matched"]["test_accuracy_ema"]
        lines.append(f"* The equivariant model's noise-to-signal ratio is the lower of the two at {lower} of the "
                     f"{len(both)} measured points (steps {', '.join(str(s) for s in both.index)}); at the end of the "
                     f"measured runs its EMA test accuracy is {eq_end:.1%} against the matched plain model's "
                     f"{matched_end:.1%}. A step's noise-to-signal ratio measures what DP-SGD does to the gradient; "
                     "accuracy also depends on how far a model gets with the signal it keeps, so the two need not agree.")
    return "\n".join(lines)


def _unresolved(record: dict) -> str:
    """Where some probes could not resolve the signal (their estimate of its squared length was ≤ 0)."""
    where = [(p["step"], sum(v <= 0 for v in p["signal_norm_probes"])) for p in record["points"]]
    where = [(step, k) for step, k in where if k]
    if not where:
        return ""
    return (" At step " + ", ".join(f"{step} ({k} of {record['probes']} probes)" for step, k in where)
            + f" the signal is below what {record['probe_size']} examples resolve (estimated ≤ 0, counted as 0 in the "
            "average), so the ratio there is uncertain: the signal is at most of the order of the probes' resolution.")


def _short(commit) -> str:
    return "unknown" if not commit else commit[:7] + (" (+dirty)" if commit.endswith("+dirty") else "")


def _times(value) -> str:
    return "an unresolved multiple of" if value is None or not math.isfinite(value) else f"{value:.0f}×"
