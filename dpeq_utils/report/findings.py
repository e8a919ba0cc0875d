"""What the evidence study found at its own scale, in one place: the comparisons that close notebook 05
(and that its section 2 decides with), each computed from the records with its 95 % interval and
decided from that interval (:func:`.stats.verdict_words`), never from a point estimate.

* :func:`privacy_cost_at_budget`: each model's non-private minus ε accuracy at the study's own length
  (part B's seeds; Welch, the estimator of part F's F3).
* :func:`length_gain`: each model's accuracy at part F's length minus at the study's length, at ε
  (part F's seeds against part A's; Welch).
* :func:`non_private_gaps`: the equivariant model minus the parameter-matched one without privacy, at
  both lengths (paired by seed).
* :func:`non_private_table`: the same as a markdown table (notebooks 03 and 05).
* :func:`privacy_costs`: every model's privacy cost at part F's length (F3, and H3 with part H's model).
* :func:`findings_lines`: the closing section, one bullet per finding; a comparison whose runs are
  not all there says "not decided yet" and which records it waits for.
* :func:`plot_privacy_costs`: each model's privacy cost with its interval, against its parameter count.
"""

from __future__ import annotations

from ..plotting import display_name
from ..study import Study
from .noise_limited import cost_points, covers_zero, part_f, welch_interval
from .sparsity import _parameters, part_h
from .stats import mean_cell, mean_interval, percent, points, verdict_words
from .tables import paired_by_seed, paired_gap, runs_by_seed


def _models(study: Study) -> tuple[str, str]:
    """The equivariant model and the parameter-matched plain one (the first two ``epsilon_models``)."""
    return tuple(study.spec["epsilon_models"][:2])


def _budget_runs(study: Study, records: dict, model: str, non_private: bool, value: str) -> dict[int, float]:
    """Part B's runs of ``model`` at the study's ε (or non-private), each at its rate chosen on validation."""
    table = study.table("B", records)
    rate = study.chosen_lr(records, model, non_private=non_private)
    fields = {"non_private": non_private} if non_private else {"non_private": False,
                                                                "target_epsilon": study.base.target_epsilon}
    return runs_by_seed(table, model, rate, value, **fields)


def privacy_cost_at_budget(study: Study, records=None, value: str = "test_accuracy_ema") -> dict[str, dict]:
    """Per model of part B: its non-private and ε runs at the study's own length (by seed) and the
    privacy cost, mean non-private − mean private accuracy with its Welch interval (None without two
    runs of each)."""
    records = study.records() if records is None else records
    out = {}
    for model in study.spec["epsilon_models"]:
        public = _budget_runs(study, records, model, True, value)
        private = _budget_runs(study, records, model, False, value)
        cost = (welch_interval(list(public.values()), list(private.values()))
                if len(public) >= 2 and len(private) >= 2 else None)
        out[model] = {"non_private": public, "private": private, "cost": cost}
    return out


def length_gain(study: Study, records=None, value: str = "test_accuracy_ema") -> dict[str, dict]:
    """Per model of part F: its ε accuracy at part F's length minus at the study's length (part A's
    seeds), each at its rate chosen on validation at that length, with a Welch interval (different
    runs, not paired); empty without a part F, None for a model without two runs at each length."""
    records = study.records() if records is None else records
    f = part_f(study, records, value)
    if not f:
        return {}
    table_a = study.table("A", records)
    out = {}
    for model in f["models"]:
        short = runs_by_seed(table_a, model, study.chosen_lr(records, model), value)
        long = f["private"][model]
        gain = welch_interval(list(long.values()), list(short.values())) if len(long) >= 2 and len(short) >= 2 else None
        out[model] = {"short": short, "long": long, "gain": gain}
    return out


def non_private_gaps(study: Study, records=None, value: str = "test_accuracy_ema") -> list[dict]:
    """The equivariant model minus the matched one without privacy (each at its own non-private rate),
    at the study's length (part B) and at part F's: per length, each model's runs by seed and the
    paired gap (None without two common seeds)."""
    records = study.records() if records is None else records
    eq, matched = _models(study)
    rows = [{"steps": study.base.update_steps, "part": "B",
             "runs": {m: _budget_runs(study, records, m, True, value) for m in (eq, matched)}}]
    f = part_f(study, records, value)
    if f:
        rows.append({"steps": f["steps"], "part": "F", "runs": {m: f["non_private"][m] for m in (eq, matched)}})
    for row in rows:
        row["gap"] = paired_by_seed(row["runs"][eq], row["runs"][matched])
    return rows


def non_private_table(study: Study, records=None) -> str:
    """:func:`non_private_gaps` as a markdown table: each model's non-private EMA test accuracy (mean ±
    95 % Student-t over seeds), the paired difference and its verdict, at each length."""
    rows = []
    models = _models(study)
    for row in non_private_gaps(study, records):
        cells = [percent(*mean_interval(list(v.values()))) if len(v) > 1 else (percent(next(iter(v.values()))) if v else "—")
                 for v in row["runs"].values()]
        gap = row["gap"]
        rows.append(f"| {row['steps']} (part {row['part']}) | " + " | ".join(cells) + " | "
                    + (f"{points(gap)} over seeds {', '.join(map(str, gap['seeds']))} | "
                       f"{verdict_words(gap, 'higher', 'lower', 'not distinguishable')} |" if gap else "not decided yet | — |"))
    return (f"From the `{study.profile}` study (EMA test accuracy, non-private; mean ± 95 % Student-t over seeds):\n\n"
            f"| steps | {display_name(models[0])} | {display_name(models[1])} | difference, paired | the equivariant model is |\n"
            "|---|---|---|---|---|\n" + "\n".join(rows))


def privacy_costs(study: Study, records=None, value: str = "test_accuracy_ema") -> dict:
    """Every model's privacy cost at part F's length: part F's two models (F3) and part H's model (H3)
    when the profile has a part H; with each model's runs, parameter count and the planned seeds."""
    records = study.records() if records is None else records
    h = part_h(study, records, value)
    if h:
        return {"steps": h["steps"], "models": h["models"], "private": h["private"], "non_private": h["non_private"],
                "costs": h["costs"], "parameters": h["parameters"], "H1": h["H1"]}
    f = part_f(study, records, value)
    if not f:
        return {}
    parameters = {m: _parameters(records, m, study.base) for m in f["models"]}
    return {"steps": f["steps"], "models": f["models"], "private": f["private"], "non_private": f["non_private"],
            "costs": f["F3"], "parameters": parameters, "H1": None}


def _seeds(interval: dict) -> str:
    return f"paired over {len(interval['seeds'])} seeds"


def findings_lines(study: Study, records=None) -> list[str]:
    """"What this scale found": one markdown bullet per finding, each with its interval and the words
    "at this budget"; a finding whose runs are missing says "not decided yet" and what it waits for."""
    from ..config import config_from_profile
    from ..data import TRAIN_SIZES
    from .baselines import method_gaps
    from .readme import baseline_gap

    records = study.records() if records is None else records
    b = study.base
    eq, matched = _models(study)
    names = {m: display_name(m) for m in (*study.spec["models"], *study.spec["epsilon_models"])}
    eps = f"ε = {b.target_epsilon:g}"
    lines = []

    # 1. the paper's own comparison at this budget
    wrn = "wrn16_4"
    against = paired_gap(study, eq, wrn, records) if wrn in study.spec["models"] else None
    head = f"**The paper's comparison at this budget** (part A, {b.update_steps} steps, {eps}): "
    if against is None:
        lines.append(head + f"against {display_name(wrn)} not decided yet (it needs two seeds of both models at "
                            "their chosen rates).")
    else:
        line = (head + f"the {names[eq]} is **{verdict_words(against)}** {display_name(wrn)} trained the same way, "
                f"{points(against)} ({_seeds(against)}).")
        recipe = baseline_gap(study, records, "de_et_al") if "de_et_al" in study.spec.get("baselines", []) else None
        if recipe is not None:
            line += (f" Against De et al.'s recipe (WRN-16-4 with {recipe['aug_mult']} views, clip {recipe['clip_norm']:g}, "
                     f"at the profile's rate {recipe['lr']:g}, not tuned on validation) it is "
                     f"**{verdict_words(recipe)}** it: {points(recipe)} ({_seeds(recipe)}).")
        elif "de_et_al" in study.spec.get("baselines", []):
            table = study.table("E", records)
            have = sorted(int(s) for s in table[table["label"].str.startswith("de_et_al")]["seed"]) if len(table) else []
            lines_wanted = (study.spec.get("baseline_seeds") or {}).get("seeds", [b.seed])
            so_far = f"records so far: seed(s) {', '.join(map(str, have)) or 'none'} of {', '.join(map(str, lines_wanted))}"
            one_seed = next((g for g in method_gaps(study, records) if g["method"] == "de_et_al" and g["interval"]), None)
            if one_seed is not None:  # notebook 06's estimate: one seed against one, the pooled one-seed interval
                gap = {"mean": -one_seed["interval"]["mean"], "ci95": one_seed["interval"]["ci95"]}
                line += (f" Against De et al.'s recipe, from one seed of it ({one_seed['how']}; as notebook 06): "
                         f"**{verdict_words(gap)}** it, {points(gap)}; the paired comparison fixed for it needs two of its "
                         f"seeds ({so_far}).")
            else:
                line += f" Against De et al.'s recipe: not decided yet (the paired comparison needs two of its seeds; {so_far})."
        lines.append(line)

    # 2. equal parameter count, under DP, at both lengths
    short = paired_gap(study, eq, matched, records)
    f = part_f(study, records)
    parts = []
    parts.append(f"at {b.update_steps} steps " + (f"**{verdict_words(short)}** it, {points(short)} ({_seeds(short)})"
                                                   if short else "not decided yet (two paired seeds needed)"))
    if f:
        planned = len(study.spec["noise_limited"]["seeds"])
        parts.append(f"at {f['steps']} steps " + (
            f"**{verdict_words(f['F1'])}** it, {points(f['F1'])} ({_seeds(f['F1'])}"
            + ("" if len(f["F1"]["seeds"]) >= planned else f" of {planned} planned") + ")"
            if f["F1"] else "not decided yet (two paired seeds needed)"))
    line = (f"**Equal parameter count, under DP** ({eps}): the {names[eq]} against the {names[matched]}: "
            + "; ".join(parts) + ".")
    if f and f["F2"]:
        line += (f" From {b.update_steps} to {f['steps']} steps the gap (equivariant − matched) changed by "
                 f"{points(f['F2'])} (Welch): "
                 + verdict_words(f["F2"], "**in the equivariant model's favour**", "**against the equivariant model**",
                                 "**not distinguishable from no change**") + ".")
    lines.append(line)

    # 3. the same comparison without privacy
    parts = []
    behind = []
    for row in non_private_gaps(study, records):
        cells = ", ".join(f"{names[m]} {mean_cell(list(row['runs'][m].values()), b.test_size)}" for m in (eq, matched))
        if row["gap"] is None:
            parts.append(f"at {row['steps']} steps {cells}; the paired difference not decided yet (two common seeds needed)")
            continue
        parts.append(f"at {row['steps']} steps {cells}: difference {points(row['gap'])} ({_seeds(row['gap'])}), the "
                     f"equivariant model **{verdict_words(row['gap'], 'higher', 'lower', 'not distinguishable')}**")
        if verdict_words(row["gap"], "higher", "lower", "neither") == "lower":
            behind.append(str(row["steps"]))
    line = "**Equal parameter count, without privacy** (each at its own non-private rate): " + "; ".join(parts) + "."
    if behind:
        line += (f" Without any noise the {names[eq]} is behind at {' and '.join(behind)} steps: a gap that exists without "
                 "noise is not a cost of privacy (each model's privacy cost is the next finding).")
    lines.append(line)

    # 4. privacy costs, at this budget's length and at part F's
    at_budget = privacy_cost_at_budget(study, records)
    cells = [f"{names[m]} {cost_points(v['cost'])}" if v["cost"] else f"{names[m]} not measured yet (two runs of each needed)"
             for m, v in at_budget.items()]
    line = (f"**Privacy cost** (non-private minus {eps} accuracy, Welch interval): at {b.update_steps} steps "
            + "; ".join(cells) + ".")
    costs = privacy_costs(study, records)
    if costs:
        cells = []
        for m in costs["models"]:
            have = f"{len(costs['non_private'][m])} non-private and {len(costs['private'][m])} private seeds"
            cells.append(f"{names.get(m, display_name(m))} {cost_points(costs['costs'][m])}, from {have}" if costs["costs"][m]
                         else f"{names.get(m, display_name(m))} not measured yet ({have}; two of each needed)")
        line += f" At {costs['steps']} steps: " + "; ".join(cells) + "."
        if f and f["F3_difference"]:
            line += (f" Equivariant minus matched: {cost_points(f['F3_difference'])}: the {names[eq]} "
                     + verdict_words(f["F3_difference"], "pays more for privacy than", "pays less for privacy than",
                                     "is not distinguishable, in what it pays for privacy, from")
                     + f" the {names[matched]} at this budget.")
    lines.append(line)

    # 5. more parameters (part H's primary test)
    if costs and len(costs["models"]) == 3:
        dense = costs["models"][2]
        if costs["H1"] is not None:
            ratio = (costs["parameters"][dense] / costs["parameters"][matched]
                     if costs["parameters"][dense] and costs["parameters"][matched] else None)
            lines.append(f"**More parameters where noise limits** (part H's primary test, {costs['steps']} steps): the "
                         f"{names[dense]}" + (f" ({ratio:.1f}× the parameters)" if ratio else "") + " **"
                         + verdict_words(costs["H1"], "pays more for privacy than", "pays less for privacy than",
                                         "is not distinguishable, in what it pays for privacy, from")
                         + f"** the {names[matched]} at this budget: difference of costs {cost_points(costs['H1'])}, "
                         f"Welch–Satterthwaite with {costs['H1']['df']:.1f} df.")
        else:
            from ..records import config_key

            spec = study.spec["sparsity"]
            grids = []
            for non_private, kind in ((False, f"at {eps}"), (True, "without privacy")):
                if study.chosen_lr(records, dense, non_private, costs["steps"]) is None:
                    grid = study.grid(dense, non_private, costs["steps"])
                    done = sum(config_key(c) in records for c in grid)
                    grids.append(f"its learning rate {kind} is not chosen yet ({done} of {len(grid)} grid runs)")
            lines.append(f"**More parameters where noise limits** (part H, {costs['steps']} steps): not decided yet; its "
                         f"primary test needs two seeds of each arm of the {names[dense]} (records so far: "
                         f"{len(costs['private'][dense])} of {len(spec['seeds'])} at {eps}, "
                         f"{len(costs['non_private'][dense])} of {len(spec['non_private_seeds'])} non-private"
                         + ("; " + "; ".join(grids) if grids else "") + ").")

    # 6. what this scale cannot say
    paper = config_from_profile("paper")
    paper_n = paper.train_size or TRAIN_SIZES[paper.dataset]
    ours = b.train_size or TRAIN_SIZES[b.dataset]
    lengths = [b.update_steps] + ([f["steps"]] if f else [])
    epochs = " and ".join(f"~{n * b.batch_size / ours:.0f}" for n in lengths)
    dataset = {"cifar10": "CIFAR-10"}.get(b.dataset, b.dataset)
    views = f"{b.aug_mult} view{'s' if b.aug_mult > 1 else ''}"
    lines.append(f"**What this scale cannot say.** Every sentence above holds at this budget only: {ours:,} {dataset} "
                 f"training images, batch {b.batch_size}, {' and '.join(map(str, lengths))} steps ({epochs} epochs), "
                 f"{views} per example. The paper's recipe trains on {paper_n:,} images at batch {paper.batch_size:,} for "
                 f"{paper.update_steps:,} steps (~{paper.update_steps * paper.batch_size / paper_n:.0f} epochs) with "
                 f"{paper.aug_mult} views per example"
                 + (", and here the equal-size gap already changed with training length (above)"
                    if f and f["F2"] and not covers_zero(f["F2"]) else "")
                 + ": none of these differences can be carried over to that scale; that takes runs of the `paper` profile.")
    return lines


def plot_privacy_costs(ax, study: Study, records=None) -> None:
    """Each model's privacy cost (non-private − ε accuracy, Welch 95 % interval), models in the order of
    their parameter counts: filled at part F's length, hollow at the study's own length (part B); a
    cost not measured yet is named in its column instead of drawn."""
    from ..plotting import MODEL_COLOURS
    from .figures import stamp

    records = study.records() if records is None else records
    costs = privacy_costs(study, records)
    at_budget = privacy_cost_at_budget(study, records)
    models = list(costs.get("models", ())) or list(at_budget)
    parameters = {m: _parameters(records, m, study.base) for m in models}
    models.sort(key=lambda m: parameters[m] or 0)
    series = [(f"{study.base.update_steps} steps", {m: v["cost"] for m, v in at_budget.items()}, -0.12, "none")]
    if costs:
        series.append((f"{costs['steps']} steps", costs["costs"], 0.12, None))
    for label, values, shift, face in series:
        drawn = False
        for x, model in enumerate(models):
            cost = values.get(model)
            colour = MODEL_COLOURS.get(model, "grey")
            if cost is None:
                if model in values:  # planned at this length but not measured yet
                    ax.text(x + shift, 0.5, f"{label}:\nnot measured yet", transform=ax.get_xaxis_transform(),
                            ha="center", va="center", fontsize=7, color="dimgrey", rotation=90)
                continue
            ax.errorbar(x + shift, 100 * cost["mean"], yerr=100 * cost["ci95"], marker="s" if face else "o",
                        markersize=8, capsize=4, color=colour, markerfacecolor=face or colour, linestyle="none",
                        label=None if drawn else label)
            drawn = True
    ax.axhline(0, color="grey", linewidth=1)
    ax.set_xticks(range(len(models)), [f"{display_name(m)}\n{parameters[m]:,} parameters" if parameters[m] else display_name(m)
                                       for m in models], fontsize=7)
    ax.set_xlim(-0.6, len(models) - 0.4)
    if ax.has_data():  # the markers' meaning in black: the colours are the models'
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color="black", linestyle="none", marker="s" if face else "o", markersize=7,
                          markerfacecolor=face or "black") for _, _, _, face in series]
        ax.legend(handles, [label for label, *_ in series], fontsize=7, loc="best", title="training length",
                  title_fontsize=7)
    ax.set(ylabel="privacy cost (points)\nnon-private − ε, 95 % Welch interval",
           title=f"What privacy costs each model, ε = {study.base.target_epsilon:g} ({study.profile})")
    stamp(ax, study)
