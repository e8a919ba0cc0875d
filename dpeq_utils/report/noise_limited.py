"""Parts F and G: the analyses fixed in ``docs/study.md`` before their runs finished, computed from
the records (F1 the primary test; F2, F3 and G secondary, reported with their intervals), and the
tables and sentences that show them (the README's block, notebooks 03 and 05)."""

from __future__ import annotations

import numpy as np
from scipy import stats

from ..plotting import MODEL_LABELS as MODEL_NAMES
from ..study import Study
from .stats import mean_cell, percent, points, verdict_words
from .tables import paired_by_seed, runs_by_seed


def covers_zero(interval: dict) -> bool:
    return interval["mean"] - interval["ci95"] <= 0 <= interval["mean"] + interval["ci95"]


def cost_points(interval: dict) -> str:
    """A privacy cost or a difference of costs with its interval, saying when the interval includes 0."""
    return points(interval) + (" (its interval includes 0)" if covers_zero(interval) else "")


def welch_interval(values, others) -> dict:
    """mean(values) − mean(others) of two independent sets of runs with its 95 % Welch interval
    (``scipy.stats.ttest_ind(..., equal_var=False).confidence_interval()``)."""
    values, others = np.asarray(values, dtype=float), np.asarray(others, dtype=float)
    result = stats.ttest_ind(values, others, equal_var=False)
    low, high = result.confidence_interval(0.95)
    return {"mean": float(values.mean() - others.mean()), "ci95": float(high - low) / 2, "df": float(result.df)}


def contrast_interval(groups: list[tuple[float, list[float]]]) -> dict:
    """Σ wᵢ·mean(groupᵢ) over independent groups of runs, with a 95 % interval whose degrees of
    freedom are Welch–Satterthwaite's: the difference of two privacy costs is
    (np_eq − dp_eq) − (np_matched − dp_matched), four groups with weights ±1."""
    terms = [(w, np.asarray(v, dtype=float)) for w, v in groups]
    estimate = sum(w * v.mean() for w, v in terms)
    variances = [w * w * v.var(ddof=1) / len(v) for w, v in terms]
    df = sum(variances) ** 2 / sum(s * s / (len(v) - 1) for s, (_, v) in zip(variances, terms))
    return {"mean": float(estimate), "ci95": float(stats.t.ppf(0.975, df) * np.sqrt(sum(variances))), "df": float(df)}


#: Where shipped records replaced by a retraining are kept (``data/reference/<profile>/superseded/``):
#: F1's and G's seed-0 arms were first trained by older code than their other seeds, and retrained.
SUPERSEDED = "superseded"


def superseded(study: Study) -> dict[str, dict]:
    """The shipped records that a retraining replaced, by key (verified against the manifest like every
    shipped record); empty when there are none."""
    from ..paths import reference_dir
    from ..records import load_records

    folder = reference_dir(study.profile) / SUPERSEDED
    return {r["key"]: r for r in load_records(folder)} if folder.is_dir() else {}


def as_first_trained(study: Study, records: dict, interval_of) -> dict | None:
    """``interval_of(records)`` with the superseded records in place of the retrained ones: the
    comparison as it stood before the retraining (None when nothing was superseded or it cannot be
    computed)."""
    old = superseded(study)
    if not old or not (set(old) & set(records)):
        return None
    return interval_of({**records, **old})


def part_f(study: Study, records=None, value: str = "test_accuracy_ema") -> dict:
    """F1, F2, F3 (``docs/study.md``); each entry is None until its runs have records."""
    records = study.records() if records is None else records
    spec = study.spec.get("noise_limited")
    if not spec:
        return {}
    steps = int(spec["steps"])
    eq, matched = study.spec["epsilon_models"][:2]
    table = study.table("F", records)
    private, public = {}, {}
    for model in (eq, matched):
        private[model] = runs_by_seed(table, model, study.chosen_lr(records, model, False, steps), value, non_private=False)
        public[model] = runs_by_seed(table, model, study.chosen_lr(records, model, True, steps), value, non_private=True)
    f1 = paired_by_seed(private[eq], private[matched])
    table_a = study.table("A", records)
    at_40 = paired_by_seed(*(runs_by_seed(table_a, m, study.chosen_lr(records, m), value) for m in (eq, matched)))
    f2 = welch_interval(f1["gaps"], at_40["gaps"]) if f1 and at_40 else None
    costs = {m: welch_interval(list(public[m].values()), list(private[m].values()))
             if len(public[m]) >= 2 and len(private[m]) >= 2 else None for m in (eq, matched)}
    difference = (contrast_interval([(1, list(public[eq].values())), (-1, list(private[eq].values())),
                                     (-1, list(public[matched].values())), (1, list(private[matched].values()))])
                  if all(costs.values()) else None)
    return {"steps": steps, "models": (eq, matched), "private": private, "non_private": public, "F1": f1,
            "gap_at_base": at_40, "F2": f2, "F3": costs, "F3_difference": difference}


def part_g(study: Study, records=None, value: str = "test_accuracy_ema") -> dict:
    """Per seed, the gap with 1 view and with K views and its change Δ; each model's own change."""
    records = study.records() if records is None else records
    spec = study.spec.get("augmentation")
    if not spec:
        return {}
    views = int(spec["aug_mult"])
    eq, matched = study.spec["epsilon_models"][:2]
    table = study.table("G", records)
    acc = {(m, k): runs_by_seed(table, m, study.chosen_lr(records, m), value, aug_mult=k)
           for m in (eq, matched) for k in (1, views)}
    gaps = {k: {s: acc[eq, k][s] - acc[matched, k][s] for s in set(acc[eq, k]) & set(acc[matched, k])}
            for k in (1, views)}
    seeds = sorted(set(gaps[1]) & set(gaps[views]))
    delta = {s: gaps[views][s] - gaps[1][s] for s in seeds}
    change = {m: paired_by_seed(acc[m, views], acc[m, 1]) for m in (eq, matched)}
    return {"views": views, "steps": int(spec["steps"]), "models": (eq, matched), "accuracy": acc, "gaps": gaps,
            "delta": delta, "delta_interval": paired_by_seed(gaps[views], gaps[1]), "own_change": change}


def noise_limited_lines(study: Study, records) -> list[str]:
    """Part F's table and its pre-registered analyses (``docs/study.md``), as far as records exist."""
    f = part_f(study, records)
    if not f or not any(f["private"].values()) and not any(f["non_private"].values()):
        return []
    eq, matched = f["models"]
    lines = ["", f"**F · The noise-limited regime** ({f['steps']} steps, ε = {study.base.target_epsilon:g} and "
                 "non-private, each at its own rate chosen on validation at this length; EMA test accuracy, mean ± "
                 "95 % Student-t over seeds, or ± 1.96 binomial standard errors for one seed)", "",
             "| model | ε = 8 | seeds | non-private | seeds | privacy cost (non-private − ε = 8, Welch) |",
             "|---|---|---|---|---|---|"]
    for model in (eq, matched):
        cells = []
        for values in (f["private"][model], f["non_private"][model]):
            cells += [mean_cell(list(values.values()), study.base.test_size), str(len(values))]
        cost = f["F3"][model]
        lines.append(f"| {MODEL_NAMES.get(model, model)} | " + " | ".join(cells) + " | "
                     + (cost_points(cost) if cost else "needs 2 seeds of each") + " |")
    return lines


def noise_limited_verdicts(study: Study, records) -> list[str]:
    f = part_f(study, records)
    if not f:
        return []
    eq, matched = f["models"]
    if f["F1"] is None:
        have = {m: len(f["private"][m]) for m in (eq, matched)}
        return [f"**Noise-limited regime** (F, {f['steps']} steps): not decided yet, the primary test needs at "
                f"least two paired seeds at each model's chosen rate (records so far: {have[eq]} equivariant, "
                f"{have[matched]} matched; {len(study.spec['noise_limited']['seeds'])} planned)."]
    gap = f["F1"]
    planned = len(study.spec["noise_limited"]["seeds"])
    line = (f"**Noise-limited regime** (F, primary test, {f['steps']} steps, ε = {study.base.target_epsilon:g}): the "
            f"equivariant ResNet-9 is **{verdict_words(gap)}** the matched plain ResNet-9: {points(gap)} (paired over seeds "
            f"{', '.join(map(str, gap['seeds']))}"
            + ("" if len(gap["seeds"]) >= planned else f"; {len(gap['seeds'])} of the {planned} planned, so provisional")
            + ").")
    before = as_first_trained(study, records, lambda r: part_f(study, r)["F1"])
    if before is not None:
        line += (f" With the seed-0 pair as first trained, by older code than the other seeds (kept in "
                 f"`superseded/`): {points(before)}.")
    if f["F2"]:
        line += (f" Against {study.base.update_steps} steps the gap changes by {points(f['F2'])} (Welch, "
                 f"{f['F2']['df']:.1f} df).")
    if f["F3_difference"]:
        line += (f" Privacy cost (non-private − ε = {study.base.target_epsilon:g}, {len(f['non_private'][eq])} and "
                 f"{len(f['non_private'][matched])} non-private seeds): equivariant {cost_points(f['F3'][eq])}, "
                 f"matched {cost_points(f['F3'][matched])}; difference {cost_points(f['F3_difference'])}.")
    else:
        have = {m: len(f["non_private"][m]) for m in (eq, matched)}
        line += (f" Privacy cost of each model: not measured yet (non-private {f['steps']}-step seeds so far: "
                 f"{have[eq]} equivariant, {have[matched]} matched; 2 of each needed).")
    return [line]


def augmentation_verdicts(study: Study, records) -> list[str]:
    """Part G in one sentence: the change of the gap with K views, paired over seeds (docs/study.md)."""
    g = part_g(study, records)
    if not g:
        return []
    eq, matched = g["models"]
    k = g["views"]
    head = f"**Augmentation multiplicity** (G, {g['steps']} steps, {k} views against 1)"
    if g["delta_interval"] is None:
        have = sum(len(v) for v in g["accuracy"].values())
        planned = 4 * len(study.spec["augmentation"]["seeds"])
        return [f"{head}: not decided yet, the paired change of the gap needs two seeds of all four arms "
                f"(records so far: {have} of {planned} runs)."]
    delta = g["delta_interval"]
    before = as_first_trained(study, records, lambda r: part_g(study, r)["delta_interval"])
    own = [f"{MODEL_NAMES.get(m, m)} {points(g['own_change'][m])} ("
           + verdict_words(g["own_change"][m], f"higher with {k} views", f"lower with {k} views",
                           "not distinguishable from no change") + ")"
           for m in (eq, matched) if g["own_change"][m]]
    return [f"{head}: with {k} views the gap (equivariant − matched) changes by {points(delta)} (paired t over seeds "
            f"{', '.join(map(str, delta['seeds']))}, {len(delta['seeds']) - 1} df: only a change far beyond the seed "
            f"spread can show): **{verdict_words(delta, 'the gap rises', 'the gap falls', 'not distinguishable from no change')}**"
            "; each model's own accuracy change: " + ", ".join(own) + "."
            + (f" With the seed-0 one-view arm as first trained, by older code (kept in `superseded/`): {points(before)}."
               if before is not None else "")]


def augmentation_lines(study: Study, records) -> list[str]:
    g = part_g(study, records)
    if not g or not any(g["accuracy"].values()):
        return []
    eq, matched = g["models"]
    k = g["views"]
    lines = ["", f"**G · Augmentation multiplicity** ({g['steps']} steps, ε = {study.base.target_epsilon:g}, each "
                 f"model at its part-A rate; EMA test accuracy per seed, 1 view → {k} views)", "",
             "| seed | equivariant | matched plain | gap, 1 view | gap, " + f"{k} views | Δ gap |", "|---|---|---|---|---|---|"]
    seeds = sorted(set().union(*(set(v) for v in g["accuracy"].values())))
    for s in seeds:
        def pair(model):
            one, many = g["accuracy"][model, 1].get(s), g["accuracy"][model, k].get(s)
            return f"{'—' if one is None else percent(one)} → {'—' if many is None else percent(many)}"
        gap1, gapk = g["gaps"][1].get(s), g["gaps"][k].get(s)
        cells = [pair(eq), pair(matched), "—" if gap1 is None else f"{100 * gap1:+.1f}",
                 "—" if gapk is None else f"{100 * gapk:+.1f}", "—" if s not in g["delta"] else f"{100 * g['delta'][s]:+.1f}"]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    if g["delta_interval"]:
        lines += ["", f"Mean change of the gap with {k} views: {points(g['delta_interval'])} (paired t over "
                      f"{len(g['delta_interval']['seeds'])} seeds)."]
    return lines
