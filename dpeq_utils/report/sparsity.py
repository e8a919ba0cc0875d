"""Part H: does a model with more parameters pay more for privacy where noise limits? The analysis
fixed in ``docs/study.md`` before any of its runs existed (H1 the primary test; H2–H4 secondary,
reported with their intervals), computed from the records, and the table and sentences that show it.
"""

from __future__ import annotations

from ..plotting import MODEL_LABELS as MODEL_NAMES
from ..study import Study
from .noise_limited import contrast_interval, cost_points, welch_interval
from .stats import mean_cell, mean_interval, points, verdict_words
from .tables import paired_by_seed, runs_by_seed


def part_h(study: Study, records=None, value: str = "test_accuracy_ema") -> dict:
    """H1–H4 (``docs/study.md``); each entry is None until its runs have records."""
    records = study.records() if records is None else records
    spec = study.spec.get("sparsity")
    if not spec or not study.spec.get("noise_limited"):
        return {}
    steps = int(study.spec["noise_limited"]["steps"])
    dense = spec["model"]
    eq, matched = study.spec["epsilon_models"][:2]
    tables = {"F": study.table("F", records), "H": study.table("H", records)}
    private, public = {}, {}
    for model, part in ((eq, "F"), (matched, "F"), (dense, "H")):
        private[model] = runs_by_seed(tables[part], model, study.chosen_lr(records, model, False, steps), value,
                                      non_private=False)
        public[model] = runs_by_seed(tables[part], model, study.chosen_lr(records, model, True, steps), value,
                                     non_private=True)
    ready = {m: len(private[m]) >= 2 and len(public[m]) >= 2 for m in (eq, matched, dense)}
    costs = {m: welch_interval(list(public[m].values()), list(private[m].values())) if ready[m] else None
             for m in (eq, matched, dense)}

    def cost_difference(first, second):
        if not (ready[first] and ready[second]):
            return None
        return contrast_interval([(1, list(public[first].values())), (-1, list(private[first].values())),
                                  (-1, list(public[second].values())), (1, list(private[second].values()))])

    seeds = sorted(set(public[dense]) & set(private[dense]) & set(public[matched]) & set(private[matched]))
    per_seed = [(public[dense][s] - private[dense][s]) - (public[matched][s] - private[matched][s]) for s in seeds]
    h4 = None
    if len(per_seed) >= 2:
        mean, half = mean_interval(per_seed)
        h4 = {"mean": mean, "ci95": half, "seeds": seeds, "gaps": per_seed}
    parameters = {m: _parameters(records, m, study.base) for m in (eq, matched, dense)}
    return {"steps": steps, "models": (eq, matched, dense), "private": private, "non_private": public,
            "parameters": parameters, "costs": costs, "H1": cost_difference(dense, matched),
            "H2": paired_by_seed(private[eq], private[dense]), "H2_cost": cost_difference(eq, dense), "H4": h4,
            "planned": {"private": len(spec["seeds"]), "non_private": len(spec["non_private_seeds"])}}


def _parameters(records: dict, model: str, base=None) -> int | None:
    """``model``'s parameter count from its records; with ``base``, only records at the budget's group,
    restriction, head and widths (part C trains the equivariant model with other groups and heads)."""
    same = ("group", "restrict", "head", "widths")
    return next((int(r["num_params"]) for r in records.values() if r["config"]["model"] == model
                 and (base is None or all(r["config"].get(f) == _plain(getattr(base, f)) for f in same))), None)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def sparsity_lines(study: Study, records) -> list[str]:
    """Part H's table: the three models' accuracy at ε = 8 and without privacy at part F's length, and
    each one's privacy cost."""
    h = part_h(study, records)
    if not h or not any(h["private"][h["models"][2]].values()) and not any(h["non_private"][h["models"][2]].values()):
        return []
    lines = ["", f"**H · Sparsity where noise limits** ({h['steps']} steps, ε = {study.base.target_epsilon:g} and "
                 "non-private, each model at its own rates chosen on validation at this length; EMA test accuracy, "
                 "mean ± 95 % Student-t over seeds)", "",
             "| model | parameters | ε = 8 | seeds | non-private | seeds | privacy cost (non-private − ε = 8, Welch) |",
             "|---|---|---|---|---|---|---|"]
    for model in h["models"]:
        cells = []
        for values in (h["private"][model], h["non_private"][model]):
            cells += [mean_cell(list(values.values()), study.base.test_size), str(len(values))]
        cost = h["costs"][model]
        params = h["parameters"][model]
        lines.append(f"| {MODEL_NAMES.get(model, model)} | {'—' if params is None else f'{params:,}'} | "
                     + " | ".join(cells) + " | " + (cost_points(cost) if cost else "needs 2 seeds of each") + " |")
    return lines


def sparsity_verdicts(study: Study, records) -> list[str]:
    """Verdict (d): H1 in one sentence, with H2 and H4 beside it."""
    h = part_h(study, records)
    if not h:
        return []
    eq, matched, dense = h["models"]
    names = {m: MODEL_NAMES.get(m, m) for m in h["models"]}
    head = f"**(d) More parameters where noise limits** (H, {h['steps']} steps, ε = {study.base.target_epsilon:g})"
    if h["H1"] is None:
        have = f"{len(h['private'][dense])} at ε = {study.base.target_epsilon:g}, {len(h['non_private'][dense])} non-private"
        return [f"{head}: not decided yet; the primary test needs at least two seeds of each arm (records of the "
                f"{names[dense]} so far: {have}; {h['planned']['private']} and {h['planned']['non_private']} planned)."]
    ratio = (h["parameters"][dense] / h["parameters"][matched]) if h["parameters"][dense] and h["parameters"][matched] else None
    words = verdict_words(h["H1"], "pays more for privacy than", "pays less for privacy than",
                          "is not distinguishable, in what it pays for privacy, from")
    complete = (len(h["private"][dense]) >= h["planned"]["private"]
                and len(h["non_private"][dense]) >= h["planned"]["non_private"])
    line = (f"{head}, primary test: the {names[dense]} ({h['parameters'][dense]:,} parameters"
            + (f", {ratio:.1f}× the matched model's" if ratio else "") + f") **{words}** the {names[matched]}: "
            f"privacy cost {cost_points(h['costs'][dense])} against {cost_points(h['costs'][matched])}; difference "
            f"{cost_points(h['H1'])} (Welch–Satterthwaite, {h['H1']['df']:.1f} df"
            + ("" if complete else "; provisional, not every planned seed has a record") + ").")
    if h["H4"]:
        line += (f" Paired by seed (sensitivity): {cost_points(h['H4'])} over seeds "
                 f"{', '.join(map(str, h['H4']['seeds']))}.")
    if h["H2"]:
        line += (f" With the same activations and {h['parameters'][dense] / h['parameters'][eq]:.1f}× fewer parameters, "
                 f"the {names[eq]} is **{verdict_words(h['H2'])}** the {names[dense]} at ε = {study.base.target_epsilon:g}: "
                 f"{points(h['H2'])} (paired over seeds {', '.join(map(str, h['H2']['seeds']))})"
                 + (f"; its privacy cost minus the {names[dense]}'s: {cost_points(h['H2_cost'])}" if h["H2_cost"] else "")
                 + ".")
    return [line]
