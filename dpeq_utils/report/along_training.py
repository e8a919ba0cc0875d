"""Signal and noise along part D's longest runs (:meth:`dpeq_utils.study.Study.mechanism`): the
table, the figure and the sentences notebook 03 shows, computed from the mechanism records."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from ..plotting import MODEL_LABELS as MODEL_NAMES
from ..study import Study
from .noise_limited import welch_interval
from .stats import verdict_words


def along_training(study: Study, records: dict[str, dict] | None = None, train_missing: bool | None = False,
                   echo=print) -> tuple[pd.DataFrame, dict[str, dict]]:
    """One row per model and measured step (the study's part-D models), and the records by model;
    models without a record (and not measured now, as ``train_missing`` says) are absent. Each point's
    signal carries the 95 % Student-t interval of the mean over its probes (disjoint sets of examples),
    and its noise-to-signal ratio the interval that follows from it (unbounded above where the
    signal's interval reaches 0: there the probes do not resolve the signal)."""
    records = study.records() if records is None else records
    found = {}
    for model in study.spec["epsilon_models"]:
        record = study.mechanism(model, records, train_missing=train_missing, echo=echo)
        if record is not None:
            found[model] = record
    return points_table(found), found


def points_table(found: dict[str, dict]) -> pd.DataFrame:
    """The rows of :func:`along_training` from mechanism records by model."""
    rows = []
    for model, record in found.items():
        for p in record["points"]:
            half = _probe_half_width(p["signal_norm_probes"])
            low, high = p["signal_norm"] - half, p["signal_norm"] + half
            rows.append({"model": model, "step": p["step"], "ε spent": p["epsilon"],
                         "median gradient norm": p["median gradient norm"], "clipped": p["clipped"],
                         "mean cosine": p["mean_cosine"], "signal norm": p["signal_norm"], "signal ± (95 %)": half,
                         "signal, lowest probe": min(p["signal_norm_probes"]),
                         "signal, highest probe": max(p["signal_norm_probes"]), "noise norm": p["noise_norm"],
                         "noise ÷ signal": p["noise_to_signal"],
                         "noise ÷ signal, from": p["noise_norm"] / high if high > 0 else math.inf,
                         "noise ÷ signal, to": p["noise_norm"] / low if low > 0 else math.inf,
                         "resolved": low > 0})
    return pd.DataFrame(rows)


def _probe_half_width(probes) -> float:
    """Half-width of the 95 % Student-t interval of the mean of a point's probe values."""
    values = np.asarray(probes, dtype=float)
    if len(values) < 2:
        return math.inf
    return float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))


def plot_along_training(axes, table: pd.DataFrame, study: Study) -> None:
    """Left: the averaged clipped signal's length with its 95 % interval over the probes; right: one
    step's noise over it (log scale) with the interval that follows. A point whose signal interval
    reaches 0 is unresolved: drawn hollow, its ratio as an arrow from the lowest value the probes
    allow (it has no upper bound)."""
    from ..plotting import MODEL_COLOURS
    from .figures import stamp

    models = list(dict.fromkeys(table["model"]))
    for model, part in table.groupby("model", sort=False):
        colour = MODEL_COLOURS.get(model)
        label = MODEL_NAMES.get(model, model)
        # the models are measured at the same steps: set them a little apart so that neither hides the other
        part = part.assign(step=part["step"] + (models.index(model) - (len(models) - 1) / 2) * 0.02 * table["step"].max())
        axes[0].plot(part["step"], part["signal norm"], color=colour, alpha=0.6, label=label)
        axes[1].plot(part["step"], part["noise ÷ signal"].where(part["resolved"]), color=colour, alpha=0.6, label=label)
        for resolved, points in part.groupby("resolved"):
            face = colour if resolved else "white"
            # a norm is not negative: the interval is cut at 0 below
            below = points[["signal ± (95 %)", "signal norm"]].min(axis=1)
            axes[0].errorbar(points["step"], points["signal norm"], yerr=[below, points["signal ± (95 %)"]], color=colour,
                             marker="o", markerfacecolor=face, linestyle="none", capsize=3)
            if resolved:
                axes[1].errorbar(points["step"], points["noise ÷ signal"],
                                 yerr=[points["noise ÷ signal"] - points["noise ÷ signal, from"],
                                       points["noise ÷ signal, to"] - points["noise ÷ signal"]],
                                 color=colour, marker="o", linestyle="none", capsize=3)
            else:
                for _, row in points.iterrows():  # only a lower bound: an arrow up from it
                    axes[1].annotate("", xy=(row["step"], row["noise ÷ signal, from"] * 4),
                                     xytext=(row["step"], row["noise ÷ signal, from"]),
                                     arrowprops={"arrowstyle": "->", "color": colour})
                    axes[1].plot(row["step"], row["noise ÷ signal, from"], marker="o", color=colour,
                                 markerfacecolor="white", linestyle="none")
    axes[0].set(xlabel="logical step", ylabel="‖mean clipped gradient‖",
                title=f"{study.profile}: the signal, 95 % over probes\n(hollow: not resolved)")
    axes[0].set_ylim(bottom=0.0)
    axes[1].set(xlabel="logical step", ylabel="noise norm ÷ signal norm", yscale="log",
                title=f"{study.profile}: noise over signal\n(arrow: no upper bound)")
    axes[0].legend(fontsize=7)
    for ax in axes:
        stamp(ax, study)


def along_training_findings(table: pd.DataFrame, found: dict[str, dict], records: dict[str, dict]) -> str:
    """What the measurements say, per model and between the two models, as markdown; every number is
    read from ``table`` and the records, and every comparison is decided from the probes' intervals."""
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
            f"steps): the signal's length goes from {_signal(first)} at step {first['step']} to {_signal(last)} at step "
            f"{last['step']} (95 % over {record['probes']} probes of {record['probe_size']} examples; "
            + ("a change beyond both intervals" if _apart(first, last) else "the two intervals overlap: a change the probes "
               "do not resolve") + "), the mean pairwise "
            f"cosine (point estimates) from {first['mean cosine']:.4f} to {last['mean cosine']:.4f}, and one step's noise from "
            f"{_ratio(first)} to {_ratio(last)} the signal. " + _largest(part) + _unresolved(record)
            + " The measured run ends at "
            f"{record['test_accuracy_ema']:.1%} EMA "
            "test accuracy; " + ("part D's record of the same run: the same (it is that run)." if same else
                                 "part D's record of the same config: "
                                 + (f"{trained['test_accuracy_ema']:.1%} (not bit-identical: that record was trained by "
                                    f"the code of commit {_short(trained.get('git_commit'))}, this measurement by "
                                    f"{_short(record.get('git_commit'))})." if trained is not None else "not there.")))
    if {"eq_resnet9", "resnet9_matched"} <= set(found):
        verdicts = {}
        for step in sorted(set.intersection(*(set(p["step"] for p in found[m]["points"])
                                              for m in ("eq_resnet9", "resnet9_matched")))):
            per_noise = {}
            for m in ("eq_resnet9", "resnet9_matched"):
                point = next(p for p in found[m]["points"] if p["step"] == step)
                per_noise[m] = [v / point["noise_norm"] for v in point["signal_norm_probes"]]
            verdicts[step] = verdict_words(welch_interval(per_noise["eq_resnet9"], per_noise["resnet9_matched"]),
                                           "more", "less", "not distinguishable")
        counts = {word: [s for s, v in verdicts.items() if v == word] for word in ("more", "less", "not distinguishable")}
        eq_end, matched_end = found["eq_resnet9"]["test_accuracy_ema"], found["resnet9_matched"]["test_accuracy_ema"]
        lines.append(
            "* Signal per unit of noise, equivariant against matched plain model, at each measured step (Welch "
            f"interval over the probes): more at {_steps(counts['more'])}, less at {_steps(counts['less'])}, not "
            f"distinguishable at {_steps(counts['not distinguishable'])}. At the end of the measured runs the equivariant "
            f"model's EMA test accuracy is {eq_end:.1%} against the matched plain model's {matched_end:.1%} (one seed "
            "each; notebook 04 and part D give their intervals). A step's noise-to-signal ratio measures what DP-SGD "
            "does to the gradient; accuracy also depends on how far a model gets with the signal it keeps, so the two "
            "need not agree.")
    return "\n".join(lines)


def _apart(one, other) -> bool:
    """Whether two points' signal intervals do not overlap."""
    return (abs(one["signal norm"] - other["signal norm"])
            > one["signal ± (95 %)"] + other["signal ± (95 %)"])


def _signal(row) -> str:
    return f"{row['signal norm']:.3g} ± {row['signal ± (95 %)']:.2g}"


def _ratio(row) -> str:
    """The noise-to-signal ratio with its interval, or its lower bound where the signal is unresolved."""
    if not row["resolved"]:
        return f"at least {row['noise ÷ signal, from']:.0f}× (the signal not resolved)"
    return f"{row['noise ÷ signal']:.0f}× ({row['noise ÷ signal, from']:.0f}–{row['noise ÷ signal, to']:.0f}×)"


def _largest(part: pd.DataFrame) -> str:
    """Where the signal is longest, said only where that step's interval lies above every other's."""
    top = part.loc[part["signal norm"].idxmax()]
    others = part.drop(index=top.name)
    if len(others) and all(_apart(top, other) for _, other in others.iterrows()):  # the largest: apart means above
        return f"The signal is longest at step {top['step']}, above every other step's interval."
    return (f"Which step's signal is longest the probes do not resolve (the intervals overlap; the largest point "
            f"estimate is at step {top['step']}).")


def _steps(steps) -> str:
    return "no step" if not steps else ("step " if len(steps) == 1 else "steps ") + ", ".join(map(str, steps))


def _unresolved(record: dict) -> str:
    """Where some probes could not resolve the signal (their estimate of its squared length was ≤ 0)."""
    where = [(p["step"], sum(v <= 0 for v in p["signal_norm_probes"])) for p in record["points"]]
    where = [(step, k) for step, k in where if k]
    if not where:
        return ""
    return (" Probes that estimated the signal's squared length at or below 0 (below what "
            f"{record['probe_size']} examples resolve; counted as 0 in the average): "
            + "; ".join(f"step {step}, {k} of {record['probes']}" for step, k in where) + ".")


def _short(commit) -> str:
    return "unknown" if not commit else commit[:7] + (" (+dirty)" if commit.endswith("+dirty") else "")

