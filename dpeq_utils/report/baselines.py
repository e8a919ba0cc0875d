"""Part E method by method (notebook 06): each method's runs over its seeds, the coordinates that
receive noise in each of its steps, its seconds per step, its difference from the equivariant model
with an interval, and the figure that plots them.

The equivariant model's runs are part A's at its chosen rate (part E's own equivariant run is part A's
seed 0), so a baseline trained at several seeds (``study.baseline_seeds``) is paired with them by seed.
A method with one seed gets the seed spread pooled over part A (:func:`.tables.seed_spread`) instead.
"""

from __future__ import annotations

import pandas as pd

from ..plotting import MODEL_COLOURS, display_name
from ..study import Study
from .cost import step_seconds_range
from .stats import mean_interval
from .tables import paired_by_seed, runs_by_seed, seed_spread

#: One colour per method of part E (the three baselines share a model, so the model's colour cannot
#: tell them apart).
METHOD_COLOURS = {"equivariant (this paper)": MODEL_COLOURS["eq_resnet9"], "de_et_al": MODEL_COLOURS["wrn16_4"],
                  "pruning_dropping": "#2166ac", "modelmix": "#b2182b"}
METHOD_MARKERS = {"equivariant (this paper)": "o", "de_et_al": "s", "pruning_dropping": "^", "modelmix": "D"}
EQUIVARIANT = "equivariant (this paper)"


def part_e_methods(study: Study, records=None, value: str = "test_accuracy_ema") -> pd.DataFrame:
    """One row per method of part E: its accuracy per seed, mean and 95 % interval (Student-t over
    seeds; with one seed, ± the pooled one-run seed spread, ``interval`` saying which), the parameters
    it trains, the coordinates that receive noise per step (parameters × the mean updated fraction),
    and the seconds per step of the fastest run of the same arithmetic."""
    records = study.records() if records is None else records
    table = study.table("E", records)
    if table.empty:
        return pd.DataFrame()
    spread = seed_spread(study, records, value)
    eq_runs = runs_by_seed(study.table("A", records), study.base.model, study.chosen_lr(records, study.base.model), value)
    rows = []
    for method in dict.fromkeys(label.partition(" seed ")[0] for label in table["label"]):
        part = table[(table["label"] == method) | table["label"].str.startswith(f"{method} seed ")]
        runs = {int(s): float(v) for s, v in zip(part["seed"], part[value])}
        if method == EQUIVARIANT and eq_runs:
            runs = {**runs, **eq_runs}
        first = part.iloc[0]
        if len(runs) >= 2:
            mean, half = mean_interval(list(runs.values()))
            how = f"Student-t over {len(runs)} seeds"
        else:
            mean = next(iter(runs.values()))
            half = spread["run"]["ci95"] if spread else float("nan")
            how = "one seed: ± the seed spread pooled over part A" if spread else "one seed: no seed spread measured"
        timed = step_seconds_range(records[first["key"]], records)
        rows.append({"method": method, "name": display_name(method), "model": first["model"], "seeds": sorted(runs),
                     "accuracy by seed": [runs[s] for s in sorted(runs)], "mean": mean, "ci95": half, "interval": how,
                     "parameters": int(first["num_params"]), "trained parameters": int(first["kept_params"]),
                     "coordinates updated per step": round(first["num_params"] * first["mean_updated_fraction"]),
                     "s per step": timed["fastest"], "runs timed": timed["runs"],
                     "test_size": int(first["test_size"])})
    return pd.DataFrame(rows)


def method_gaps(study: Study, records=None, value: str = "test_accuracy_ema") -> list[dict]:
    """Each baseline minus the equivariant model: paired over their common seeds when there are two
    (``how`` says so), else the single-seed difference with the 95 % interval of a one-seed gap pooled
    over part A's paired gaps; ``None`` as interval when neither exists."""
    records = study.records() if records is None else records
    methods = part_e_methods(study, records, value)
    if methods.empty or EQUIVARIANT not in set(methods["method"]):
        return []
    eq = methods.set_index("method").loc[EQUIVARIANT]
    eq_runs = dict(zip(eq["seeds"], eq["accuracy by seed"]))
    spread = seed_spread(study, records, value)
    out = []
    for _, row in methods[methods["method"] != EQUIVARIANT].iterrows():
        runs = dict(zip(row["seeds"], row["accuracy by seed"]))
        paired = paired_by_seed(runs, eq_runs)
        if paired is not None:
            out.append({"method": row["method"], "interval": paired, "how": f"paired over seeds {', '.join(map(str, paired['seeds']))}"})
            continue
        common = sorted(set(runs) & set(eq_runs))
        if common and spread and spread["gap"]:
            s = common[0]
            out.append({"method": row["method"], "interval": {"mean": runs[s] - eq_runs[s], "ci95": spread["gap"]["ci95"]},
                        "how": f"seed {s} only; ± from part A's paired gaps, pooled SD {100 * spread['gap']['sd']:.1f} "
                               f"points, {spread['gap']['df']} df"})
        else:
            out.append({"method": row["method"], "interval": None, "how": "no seed in common with the equivariant runs"})
    return out


def plot_e(axes, study: Study, records=None) -> None:
    """Part E: each method's EMA test accuracy against its seconds per step (left) and against the
    coordinates that receive noise in each step (right, log scale). A method with several seeds: its
    mean with the Student-t interval (filled marker) and each seed as a small dot; a method with one
    seed: a hollow marker with ± the pooled one-run seed spread (what another seed could give)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from .figures import stamp

    methods = part_e_methods(study, records)
    xs = {column: _dodged(methods[column].tolist()) if len(methods) else []
          for column in ("s per step", "coordinates updated per step")}
    for i, (_, row) in enumerate(methods.iterrows()):
        colour = METHOD_COLOURS.get(row["method"], "grey")
        several = len(row["seeds"]) > 1
        label = f"{row['name']} ({len(row['seeds'])} seed{'s' if several else ''})"
        for ax, x in zip(axes, (xs["s per step"][i], xs["coordinates updated per step"][i])):
            ax.errorbar(x, row["mean"], yerr=row["ci95"], color=colour, capsize=4, linestyle="none",
                        marker=METHOD_MARKERS.get(row["method"], "o"), markersize=9,
                        markerfacecolor=colour if several else "white", markeredgewidth=1.5, label=label)
            if several:
                ax.scatter([x] * len(row["seeds"]), row["accuracy by seed"], s=12, color=colour, alpha=0.6, zorder=3)

    def compact(x, _):
        return f"{x / 1e6:g} M" if x >= 1e6 else f"{x / 1e3:g} k" if x >= 1e3 else f"{x:g}"

    for ax in axes:
        ax.axhline(0.1, color="grey", linestyle=":", linewidth=1, label="chance (10 %)" if ax is axes[1] else None)
        if len(methods):
            ax.margins(x=0.12)
    axes[0].set_xlim(left=0)
    for ax in axes:  # an accuracy below 0 means nothing: a wide interval is cut at 0
        ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]))
    axes[1].set_xscale("log")
    axes[1].xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes[1].xaxis.set_major_formatter(FuncFormatter(compact))
    axes[1].xaxis.set_minor_formatter(NullFormatter())
    b = study.base
    axes[0].set(xlabel="seconds per step (fastest run of the same arithmetic)",
                ylabel="test accuracy (EMA), 95 % interval",
                title=f"E · {study.profile}: ε = {b.target_epsilon:g}, batch {b.batch_size}, {b.update_steps} steps")
    axes[1].set(xlabel="coordinates that receive noise per step (log scale)", title="noise lands on the updated coordinates")
    if len(methods):
        axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), title="filled: mean of seeds\nhollow: one seed",
                       title_fontsize=7)
    else:
        axes[0].text(0.5, 0.5, f"no {study.profile} records of part E yet", transform=axes[0].transAxes, ha="center")
    for ax in axes:
        stamp(ax, study)


def _dodged(values: list[float], apart: float = 0.04, step: float = 0.07) -> list[float]:
    """``values`` with those within ``apart`` (relative) of each other moved apart by factors of
    1 ± ``step``, so that methods with the same x (WRN-16-4 updates every coordinate in two methods)
    do not hide each other."""
    out = list(values)
    done = set()
    for i, x in enumerate(values):
        if i in done:
            continue
        group = [j for j, y in enumerate(values) if j not in done and abs(y - x) <= apart * max(abs(x), 1e-12)]
        for k, j in enumerate(group):
            out[j] = values[j] * (1 + step) ** (k - (len(group) - 1) / 2)
            done.add(j)
    return out
