"""Parts F and G: the analyses fixed in ``docs/study.md`` before their runs finished, computed from
the records (F1 the primary test; F2, F3 and G secondary, reported with their intervals)."""

from __future__ import annotations

import numpy as np
from scipy import stats

from ..study import Study
from .stats import paired_interval


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


def _by_seed(table, model: str, lr: float | None, value: str = "test_accuracy_ema", **fields) -> dict[int, float]:
    """``value`` per seed of ``model``'s runs at rate ``lr`` (and ``fields``) in a part's table."""
    if lr is None or table.empty:
        return {}
    rows = table[(table["model"] == model) & (table["lr"] == lr)]
    for name, wanted in fields.items():
        rows = rows[rows[name] == wanted]
    return {int(s): float(v) for s, v in zip(rows["seed"], rows[value])}


def _paired(first: dict[int, float], second: dict[int, float]) -> dict | None:
    seeds = sorted(set(first) & set(second))
    if len(seeds) < 2:
        return None
    mean, half = paired_interval([first[s] for s in seeds], [second[s] for s in seeds])
    return {"mean": mean, "ci95": half, "seeds": seeds, "gaps": [first[s] - second[s] for s in seeds]}


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
        private[model] = _by_seed(table, model, study.chosen_lr(records, model, False, steps), value, non_private=False)
        public[model] = _by_seed(table, model, study.chosen_lr(records, model, True, steps), value, non_private=True)
    f1 = _paired(private[eq], private[matched])
    table_a = study.table("A", records)
    at_40 = _paired(*(_by_seed(table_a, m, study.chosen_lr(records, m), value) for m in (eq, matched)))
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
    acc = {(m, k): _by_seed(table, m, study.chosen_lr(records, m), value, aug_mult=k)
           for m in (eq, matched) for k in (1, views)}
    gaps = {k: {s: acc[eq, k][s] - acc[matched, k][s] for s in set(acc[eq, k]) & set(acc[matched, k])}
            for k in (1, views)}
    seeds = sorted(set(gaps[1]) & set(gaps[views]))
    delta = {s: gaps[views][s] - gaps[1][s] for s in seeds}
    change = {m: _paired(acc[m, views], acc[m, 1]) for m in (eq, matched)}
    return {"views": views, "steps": int(spec["steps"]), "models": (eq, matched), "accuracy": acc, "gaps": gaps,
            "delta": delta, "delta_interval": _paired(gaps[views], gaps[1]), "own_change": change}
