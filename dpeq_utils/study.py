"""The evidence study: the paper's claims put to a test, as one protocol that every profile sizes.

A profile's ``study`` section fixes a shared budget (``run``: data sizes, batch, steps, ε, clip,
…) and the lists below. Parts (each a set of run configs; a config's record is its result):

``A``  equal budget, different models (``models``) at the run's ε. The learning rate of each model
       is chosen on the **validation split** (held out of the training set, the same for every
       seed) from ``lr_grid`` at seed 0, then the other ``seeds`` run at the chosen rate.
``B``  accuracy against ε (``epsilons``; the run's ε is part A) and non-private, for
       ``epsilon_models`` and ``epsilon_seeds``, at each model's part-A learning rate; the
       non-private runs get their own rate from ``lr_grid_non_private`` on the validation split
       (unclipped mean gradients are far larger than clipped ones).
``C``  which symmetry: ``groups`` (restricted to the halved subgroup where one exists) and, for
       the run's group, the two design ablations (no restriction; a global, invariant head), seed
       0, at the equivariant model's learning rate.
``D``  training length: ``lengths`` logical steps (σ recalibrated for each), evaluated at four
       points along the way, for ``epsilon_models`` at their part-A rates, seed 0.
``E``  the other ways of making DP-SGD work (``baselines``: entries of the profile's
       ``baselines`` section) at the same budget, beside the equivariant model's part-A run.
``F``  the noise-limited regime (optional section ``noise_limited``): ``epsilon_models`` trained
       ``steps`` logical steps at the run's ε (σ recalibrated), each with its own learning rate
       chosen on the validation split from ``lr_grid`` at seed 0, then ``seeds`` at that rate; and
       non-private at the same length (``lr_grid_non_private``, ``non_private_seeds``), so each
       model's privacy cost (non-private minus private accuracy) is measured where training is long
       enough for noise, not the number of steps, to limit it. Configured like part D's longer runs
       (four evaluations, the same EMA horizons), so part D's run at that length counts here.
``G``  one ingredient of the paper's recipe (optional section ``augmentation``): augmentation
       multiplicity ``aug_mult`` against one view, for ``epsilon_models`` at ``steps`` logical steps
       and part-A rates, ``seeds``; one view at seed 0 is part D's run of that length.
``H``  sparsity where noise limits (optional section ``sparsity``, with part F): a dense ``model``
       with more parameters than part F's, trained as part F trains its models (``steps`` of
       ``noise_limited``, its own learning-rate grids on the validation split at that length, at ε
       and non-private, ``seeds`` and ``non_private_seeds``), so that its privacy cost can be set
       beside theirs: does a model with more parameters pay more for privacy at equal budget?

Part E's baselines run at seed 0; the optional section ``baseline_seeds`` runs the ones it names at
further ``seeds`` too, paired with part A's runs of the equivariant model at those seeds.

The test set is never used to choose anything. :func:`plan` turns the records that exist into the
runs that can be named now, so a study can be stopped and restarted at any time and trains only
what is missing: ``python -m dpeq_utils study run --profile teach`` (records of the shipped
studies live in ``data/reference/<profile>/``, see :mod:`dpeq_utils.runs`).

Why one file of ~510 lines: the parts' plans (which runs, at which rates, in which order) and
their execution read the same spec and records; its tables and figures are :mod:`dpeq_utils.report`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import RunConfig, baseline_changes, config_from_profile, load_profile
from .equivariance import can_halve
from .estimate import minutes_to_train, training_question

if TYPE_CHECKING:
    import pandas as pd

PARTS = ("A", "B", "C", "D", "E", "F", "G", "H")
#: The order parts are trained in: the training-length question (D) before the choice of group (C);
#: part B's seeds after the first come after D.
TRAINING_ORDER = ("A", "B", "D", "C", "E", "F", "G", "H")
#: The protocol's fields and what each means (a profile's ``study`` section sets every one).
FIELDS = {
    "run": "changes to the profile's run section shared by every study run (the budget)",
    "lr_grid": "learning rates tried for each model under DP (seed 0, chosen on the validation split)",
    "lr_grid_non_private": "learning rates tried for the non-private reference runs",
    "seeds": "seeds of part A",
    "models": "models of part A",
    "epsilons": "target ε of part B (besides the run's)",
    "epsilon_models": "models of parts B and D",
    "epsilon_seeds": "seeds of part B",
    "groups": "groups of part C (besides the run's)",
    "lengths": "logical steps of part D (besides the run's)",
    "ema_horizons": "further EMA decays scored along part D's longer runs (the EMA never changes training)",
    "baselines": "entries of the profile's baselines section compared in part E",
}
#: Optional sections (a profile without one has no such part) and the fields each must set.
OPTIONAL_SECTIONS = {
    "noise_limited": {
        "steps": "logical steps of part F's runs",
        "lr_grid": "learning rates tried under DP at that length (seed 0, chosen on the validation split)",
        "seeds": "seeds of part F's private runs (seed 0 is the grid's run at the chosen rate)",
        "lr_grid_non_private": "learning rates tried for the non-private runs at that length",
        "non_private_seeds": "seeds of part F's non-private runs",
    },
    "augmentation": {
        "steps": "logical steps of part G's runs",
        "aug_mult": "views per example compared with one",
        "seeds": "seeds of part G (both view counts)",
    },
    "sparsity": {
        "model": "part H's dense model (not one of epsilon_models), trained at part F's length",
        "lr_grid": "its learning rates tried under DP at that length (seed 0, chosen on the validation split)",
        "seeds": "seeds of its private runs (seed 0 is the grid's run at the chosen rate)",
        "lr_grid_non_private": "its learning rates tried for the non-private runs at that length",
        "non_private_seeds": "seeds of its non-private runs",
    },
    "baseline_seeds": {
        "baselines": "entries of part E's baselines that also run at the seeds below",
        "seeds": "their seeds (paired with part A's runs of the equivariant model)",
    },
}


@dataclass(frozen=True)
class Planned:
    part: str  # A, B, C, D, E
    stage: str  # "grid" (a learning-rate candidate), "seeds", or "" (a run at a chosen rate)
    label: str  # what the run is, for tables and logs
    config: RunConfig


class Study:
    """The study of one profile: its configs, its records, its tables."""

    def __init__(self, profile: str = "teach", runs_dir=None, write_reference: bool = False,
                 resume_other_code: bool = False):
        """``runs_dir``: the user's records of this profile, read after the shipped ones and where
        new runs are written (default ``data/runs/<profile>``). ``write_reference``: ``runs_dir`` may
        be a folder of shipped records (extending the shipped study on purpose; :mod:`dpeq_utils.shipped`)."""
        content = load_profile(profile)
        spec = content.get("study")
        if not isinstance(spec, dict):
            raise ValueError(f"profile {profile!r} has no 'study' section; the fields are: {', '.join(FIELDS)}")
        missing = [f for f in FIELDS if f not in spec]
        unknown = [f for f in spec if f not in FIELDS and f not in OPTIONAL_SECTIONS]
        if missing or unknown:
            raise ValueError(f"profile {profile!r}: study section lacks {missing} / has unknown {unknown}")
        for name, fields in OPTIONAL_SECTIONS.items():
            section = spec.get(name)
            if section is not None and (not isinstance(section, dict) or set(section) != set(fields)):
                raise ValueError(f"profile {profile!r}: study.{name} must set exactly {', '.join(fields)}")
        if spec.get("sparsity") is not None and (not spec.get("noise_limited")
                                                  or spec["sparsity"]["model"] in spec["epsilon_models"]):
            raise ValueError(f"profile {profile!r}: study.sparsity (part H) trains at part F's length, so it needs "
                             "study.noise_limited, and its model must not be one of epsilon_models (part F's)")
        if spec.get("baseline_seeds") is not None and not set(spec["baseline_seeds"]["baselines"]) <= set(
                spec["baselines"]):
            raise ValueError(f"profile {profile!r}: study.baseline_seeds.baselines must be among study.baselines")
        self.source = profile  # a name or a path: where the profile is read from
        self.profile = Path(profile).stem  # the name records are filed under
        self.runs_dir = runs_dir
        self.write_reference = write_reference
        self.resume_other_code = resume_other_code  # continue checkpoints written by other dpeq code (listed in the record)
        self.spec = spec
        self.base = config_from_profile(profile, **spec["run"]).replace(profile=self.profile)
        if self.base.validation_size == 0 and max(len(spec["lr_grid"]), len(spec["lr_grid_non_private"])) > 1:
            raise ValueError(f"profile {profile!r}: choosing among several learning rates needs a validation split; "
                             "set study.run.validation_size > 0 or give each grid a single rate")

    # ------------------------------------------------------------------------------------------ configs

    def length_changes(self, steps: int) -> dict:
        """How a run of ``steps`` logical steps differs from the budget's (parts D, F, G): four
        evaluations along the way and the further EMA horizons scored."""
        if steps == self.base.update_steps:
            return {}
        return {"update_steps": steps, "eval_every": max(1, steps // 4),
                "ema_horizons": tuple(float(d) for d in self.spec["ema_horizons"])}

    def long_section(self, model: str) -> dict:
        """The spec of ``model``'s runs at part F's length: part H's section for its model, else part F's."""
        h = self.spec.get("sparsity")
        return h if h and model == h["model"] else self.spec["noise_limited"]

    def grid(self, model: str, non_private: bool = False, steps: int | None = None) -> list[RunConfig]:
        """The learning-rate candidates of ``model`` (seed 0); ``steps``: its grid at part F's length
        (part H's grids for part H's model)."""
        spec = self.spec if steps is None else self.long_section(model)
        rates = spec["lr_grid_non_private" if non_private else "lr_grid"]
        changes = {} if steps is None else self.length_changes(steps)
        return [self.base.replace(model=model, lr=float(lr), non_private=non_private, **changes) for lr in rates]

    def chosen_lr(self, records: dict[str, dict], model: str, non_private: bool = False,
                  steps: int | None = None) -> float | None:
        """The rate whose seed-0 run has the best EMA validation accuracy (ties: the smaller rate);
        None until every candidate has a record."""
        from .records import config_key

        candidates = self.grid(model, non_private, steps)
        if len(candidates) == 1:  # nothing to choose (e.g. the paper's fixed rate)
            return candidates[0].lr
        results = [records.get(config_key(c)) for c in candidates]
        if any(r is None for r in results):
            return None
        return max(zip(candidates, results), key=lambda cr: (cr[1]["val_accuracy_ema"], -cr[0].lr))[0].lr

    def grids(self, records: dict[str, dict]) -> list[dict]:
        """Every learning-rate grid the study searches, with its candidates and the rate chosen on
        validation (None until every candidate has a record): part A per model, part B's non-private
        grids, part F's two grids per model at its length, part H's two. A choice at either end of its grid may have
        a better rate beyond it (the report says so)."""
        s = self.spec
        wanted = [("A", m, False, None) for m in dict.fromkeys([*s["models"], *s["epsilon_models"], self.base.model])]
        wanted += [("B", m, True, None) for m in s["epsilon_models"]]
        if s.get("noise_limited"):
            steps = int(s["noise_limited"]["steps"])
            wanted += [("F", m, np_, steps) for m in s["epsilon_models"] for np_ in (False, True)]
            if s.get("sparsity"):
                wanted += [("H", s["sparsity"]["model"], np_, steps) for np_ in (False, True)]
        rows = []
        for part, model, non_private, steps in wanted:
            rates = sorted(c.lr for c in self.grid(model, non_private, steps))
            if len(rates) > 1:
                rows.append({"part": part, "model": model, "non_private": non_private, "steps": steps,
                             "rates": rates, "chosen": self.chosen_lr(records, model, non_private, steps)})
        return rows

    def plan(self, records: dict[str, dict]) -> tuple[list[Planned], list[str]]:
        """Every run that can be named now, in the order of the parts, and what still waits for a
        learning rate. ``records`` maps config keys to records."""
        s, base = self.spec, self.base
        planned: list[Planned] = []
        waiting: list[str] = []
        eq_model = base.model
        lr = {(m, np_): self.chosen_lr(records, m, np_) for m in {*s["models"], *s["epsilon_models"], eq_model}
              for np_ in (False, True)}

        def at_rate(part, label, model, non_private=False, **changes):
            rate = lr[(model, non_private)]
            if rate is None:
                waiting.append(f"part {part}: {label} (the learning rate of {model} is not chosen yet)")
            else:
                planned.append(Planned(part, "", label, base.replace(model=model, lr=rate, non_private=non_private,
                                                                     **changes)))

        for model in s["models"]:
            planned += [Planned("A", "grid", f"{model} lr {c.lr:g}", c) for c in self.grid(model)]
            for seed in s["seeds"]:
                if seed != base.seed:
                    at_rate("A", f"{model} seed {seed}", model, seed=seed)
        for model in s["epsilon_models"]:
            planned += [Planned("A", "grid", f"{model} lr {c.lr:g}", c) for c in self.grid(model)]
            planned += [Planned("B", "grid", f"{model} non-private lr {c.lr:g}", c)
                        for c in self.grid(model, non_private=True)]
            for seed in s["epsilon_seeds"]:
                for eps in s["epsilons"]:
                    at_rate("B", f"{model} ε {eps:g} seed {seed}", model, seed=seed, target_epsilon=float(eps))
                at_rate("B", f"{model} ε {base.target_epsilon:g} seed {seed}", model, seed=seed)
                at_rate("B", f"{model} non-private seed {seed}", model, non_private=True, seed=seed)
        planned += [Planned("A", "grid", f"{eq_model} lr {c.lr:g}", c) for c in self.grid(eq_model)]
        for group in s["groups"]:
            at_rate("C", f"{group}{' restricted' if can_halve(group) else ''}", eq_model, group=group,
                    restrict=can_halve(group))
        at_rate("C", f"{base.group}{' restricted' if base.restrict else ''} (the paper's)", eq_model)
        at_rate("C", f"{base.group} without restriction", eq_model, restrict=False)
        at_rate("C", f"{base.group} with a global (invariant) head", eq_model, head="global")
        for model in s["epsilon_models"]:
            at_rate("D", f"{model} {base.update_steps} steps", model)  # the part-A run at seed 0
            for steps in s["lengths"]:  # longer runs, evaluated at four points along the way
                at_rate("D", f"{model} {steps} steps", model, **self.length_changes(steps))
        at_rate("E", "equivariant (this paper)", eq_model)
        for name, change in baseline_changes(self.source, s["baselines"], equal_budget=True).items():
            planned.append(Planned("E", "", name, base.replace(**change)))
        if s.get("baseline_seeds"):
            paired = s["baseline_seeds"]
            for name, change in baseline_changes(self.source, paired["baselines"], equal_budget=True).items():
                planned += [Planned("E", "", f"{name} seed {seed}", base.replace(**change, seed=seed))
                            for seed in paired["seeds"] if seed != base.seed]
        if s.get("noise_limited"):
            self._plan_long("F", s["epsilon_models"], records, planned, waiting)
        if s.get("augmentation"):
            g = s["augmentation"]
            for model in s["epsilon_models"]:
                for views in (1, int(g["aug_mult"])):
                    for seed in g["seeds"]:
                        at_rate("G", f"{model} {views} view{'s' if views > 1 else ''} seed {seed}", model, seed=seed,
                                aug_mult=views, **self.length_changes(int(g["steps"])))
        if s.get("sparsity"):
            self._plan_long("H", [s["sparsity"]["model"]], records, planned, waiting)
        return planned, waiting

    def _plan_long(self, part: str, models: list[str], records: dict[str, dict], planned: list, waiting: list) -> None:
        """Parts F and H: per model and privacy setting, a learning-rate grid at part F's length, then seeds."""
        steps = int(self.spec["noise_limited"]["steps"])
        for model in models:
            f = self.long_section(model)
            for non_private in (False, True):
                kind = "non-private" if non_private else f"ε {self.base.target_epsilon:g}"
                planned.extend(Planned(part, "grid", f"{model} {kind} {steps} steps lr {c.lr:g}", c)
                               for c in self.grid(model, non_private, steps))
                rate = self.chosen_lr(records, model, non_private, steps)
                seeds = f["non_private_seeds" if non_private else "seeds"]
                for seed in seeds:
                    label = f"{model} {kind} {steps} steps seed {seed}"
                    if rate is None:
                        if seed != self.base.seed:  # the grid ran this seed: its run at the chosen rate is this one
                            waiting.append(f"part {part}: {label} (its learning rate at {steps} steps is not chosen yet)")
                    else:
                        planned.append(Planned(part, "seeds", label, self.base.replace(
                            model=model, lr=rate, non_private=non_private, seed=seed, **self.length_changes(steps))))

    def mechanism_steps(self) -> list[int]:
        """Where part D's longest run is measured along the way: at initialisation and at each of
        part D's lengths."""
        return sorted({0, int(self.base.update_steps), *(int(s) for s in self.spec["lengths"])})

    def mechanism(self, model: str, records: dict[str, dict] | None = None, train_missing: bool | None = False,
                  progress: bool = False, echo=print) -> dict | None:
        """Signal and noise along part D's longest run of ``model`` (:mod:`dpeq_utils.mechanism`):
        the shipped or user's record, else measured (it retrains that run) as ``train_missing`` says
        (see :meth:`complete`), else None (also while the run's learning rate is not chosen)."""
        from .mechanism import find_along_training, measure_and_write_along_training

        records = self.records() if records is None else records
        rate = self.chosen_lr(records, model)
        if rate is None:
            return None
        longest = max(self.mechanism_steps())
        config = self.base.replace(model=model, lr=rate, **self.length_changes(longest))
        found = find_along_training(config, self.mechanism_steps(), runs_dir=self.runs_dir)
        if found is not None or train_missing is False:
            return found
        if train_missing is None:
            question = training_question(f"{model}'s {longest}-step run to measure signal and noise along it",
                                         minutes_to_train([config], self.profile, self.runs_dir), self.profile)
            if question:
                echo(question)
                return None
        return measure_and_write_along_training(config, self.mechanism_steps(), runs_dir=self.runs_dir,
                                                write_reference=self.write_reference, progress=progress)

    # ------------------------------------------------------------------------------------------ records

    def records(self) -> dict[str, dict]:
        """Every record of this profile that the lookup finds (shipped reference first, then the user's)."""
        from .records import find_records

        return {r["key"]: r for r in find_records(self.profile, self.runs_dir)}

    def missing(self, parts=PARTS, records: dict[str, dict] | None = None) -> list[Planned]:
        """Runs of ``parts`` (and the learning-rate grids they need) without a record, in the order
        they are trained: the main comparison (``epsilon_models``) before the other models, grids
        before the runs that wait for them, parts in order, and runs over 4× the budget's steps last,
        so a study cut short still answers the main question."""
        from .records import config_key

        records = self.records() if records is None else records
        planned, _ = self.plan(records)
        needed = [p for p in planned if p.part in parts or (p.stage == "grid" and _grid_needed(p, parts, self.spec))]
        seen, todo = set(), []
        main = set(self.spec["epsilon_models"])

        def order(p: Planned):
            steps = p.config.update_steps or 0
            if p.part in ("F", "G", "H"):  # after A-E; F's private runs, then its non-private ones, then G, then H
                return (True, True, p.part, p.config.non_private, p.stage != "grid", p.config.seed, 0)
            rank = TRAINING_ORDER.index(p.part)
            if p.part == "B" and p.config.seed != self.base.seed:
                rank += 1.5  # B's further seeds after D: one seed of every question first
            return (False, steps > 4 * (self.base.update_steps or 0), p.config.model not in main, p.stage != "grid",
                    rank, steps)

        for item in sorted(needed, key=order):
            key = config_key(item.config)
            if key not in seen and key not in records:
                seen.add(key)
                todo.append(item)
        return todo

    def _announce(self, todo: list[Planned], minutes: float | None, echo) -> None:
        """Say what is about to train before it does, and about how long it takes: a notebook
        under a profile without shipped records (a renamed copy of ``teach``, say) would otherwise
        start hours of training without a word."""
        from .paths import reference_dir

        shipped = reference_dir(self.profile)
        echo(f"[study {self.profile}] {len(todo)} runs of part(s) {', '.join(sorted({t.part for t in todo}))} have no "
             "record" + ("" if shipped.is_dir() else f" (no shipped records for this profile: {shipped} does not "
                         "exist)") + "; training them now"
             + ("" if minutes is None else f" (about {minutes:.0f} min)")
             + ", and more once their learning rates are chosen. To see only the records that exist, set "
             "train_missing=False (notebooks) or stop with Ctrl-C (runs resume from their checkpoints).")

    def complete(self, parts=PARTS, progress: bool = False, max_runs: int | None = None, echo=print,
                 executor: str = "inprocess", concurrency: int = 1, train_missing: bool | None = True,
                 **executor_options) -> int:
        """Train the missing runs of ``parts`` and return how many were trained.

        ``train_missing`` (the notebooks' parameter): True trains them whatever they cost; False
        trains nothing; None trains them only if the runs missing now would take at most
        :data:`dpeq_utils.estimate.ASK_ABOVE_MINUTES` (estimated from records' throughput), and otherwise says how long
        they would take and how to ask for them.

        ``executor="inprocess"``: one at a time in this process, re-planning after each (as rates get
        chosen). ``"local"``, ``"slurm"`` or ``"debug"``: every run that can start now is handed to
        that :mod:`dpeq_utils.sweep` executor at once (``concurrency`` at a time locally; Slurm
        options such as ``partition``, ``gpus_per_run``, ``time_min`` as keywords), then the study
        re-plans and submits the next wave, until nothing is missing."""
        if train_missing is False:
            return 0
        todo = self.missing(parts)
        if todo:
            # timed here only when the answer decides whether to train (train_missing=None)
            estimate = minutes_to_train([t.config for t in todo], self.profile, self.runs_dir,
                                        measure_unknown=train_missing is None)
            question = train_missing is None and training_question(
                f"the {len(todo)} runs of part(s) {', '.join(sorted({t.part for t in todo}))} that have no record "
                "(and more once their learning rates are chosen)", estimate, self.profile,
                f"(notebooks) or run `python -m dpeq_utils study run --profile {self.source}` (runs "
                "resume from their checkpoints)")
            if question:
                echo(question)
                return 0
            self._announce(todo, estimate[0], echo)
        if executor != "inprocess":
            return self._complete_in_waves(parts, executor, concurrency, echo, executor_options)
        from .data import load_splits
        from .runs import run

        cache: dict[tuple, object] = {}
        done = 0
        while max_runs is None or done < max_runs:
            todo = self.missing(parts)
            if not todo:
                break
            item = todo[0]
            c = item.config
            data_key = (c.dataset, c.train_size, c.test_size, c.validation_size, c.seed)
            if data_key not in cache:
                cache.clear()  # one seed's splits at a time
                cache[data_key] = load_splits(c.dataset, train_size=c.train_size, test_size=c.test_size,
                                              validation_size=c.validation_size, seed=c.seed)
            started = time.perf_counter()
            record = run(c, runs_dir=self.runs_dir, progress=progress, data=cache[data_key],
                         write_reference=self.write_reference, resume_other_code=self.resume_other_code)
            done += 1
            echo(f"[study {self.profile}] {item.part} {item.label:42s} val {record.get('val_accuracy_ema', float('nan')):.3f} "
                 f"test {record['test_accuracy']:.3f} (EMA {record['test_accuracy_ema']:.3f}), "
                 f"{time.perf_counter() - started:.0f} s, {len(todo) - 1} left")
        return done

    def _complete_in_waves(self, parts, executor: str, concurrency: int, echo, options: dict) -> int:
        from .paths import runs_dir as default_runs_dir
        from .sweep import make_executor, outcomes, submit

        runs_dir = Path(self.runs_dir) if self.runs_dir is not None else default_runs_dir(self.profile)
        trained = 0
        while todo := self.missing(parts):
            echo(f"[study {self.profile}] submitting {len(todo)} runs to {executor}")
            configs = [p.config for p in todo]
            jobs = submit(make_executor(executor, runs_dir / "sweep-logs", **options), configs,
                          runs_dir, concurrency=concurrency, echo=lambda _: None, write_reference=self.write_reference)
            # what became of each, from its record and its job's JSON status (no result pickle is loaded)
            failed = [o for o in outcomes(jobs, configs, runs_dir) if o.record is None]
            if failed:  # the next wave would wait for them forever
                raise RuntimeError(f"{len(failed)} of {len(jobs)} runs failed, e.g. job {failed[0].job_id}: {failed[0].error}")
            trained += len(jobs)
        return trained

    def table(self, part: str, records: dict[str, dict] | None = None) -> "pd.DataFrame":
        """The named runs of one part that have records: one row per run (label, stage, config
        fields, results). Missing runs are absent; :meth:`missing` lists them."""
        from .records import config_key, results_table

        records = self.records() if records is None else records
        planned, _ = self.plan(records)
        rows = [(p, records[config_key(p.config)]) for p in planned if p.part == part and config_key(p.config) in records]
        table = results_table([r for _, r in rows])
        if len(rows):
            table.insert(0, "label", [p.label for p, _ in rows])
            table.insert(1, "stage", [p.stage for p, _ in rows])
        return table.drop_duplicates("key", keep="last").reset_index(drop=True) if len(rows) else table


def _grid_needed(item: Planned, parts, spec) -> bool:
    """Is this learning-rate candidate needed by one of ``parts``?"""
    model = item.config.model
    if item.part in ("F", "H"):  # their own grids, at their own length
        return item.part in parts
    if item.part == "B":  # the non-private grid
        return "B" in parts
    return ("A" in parts and model in spec["models"]) or (
        any(p in parts for p in "BD") and model in spec["epsilon_models"]) or (
        any(p in parts for p in "CE") and model == "eq_resnet9")


def main(argv: list[str] | None = None) -> int:
    from .cli import command_parser, user_errors

    parser = command_parser("study", __doc__.split("\n\n")[0], profile="teach", records=True)
    parser.add_argument("command", choices=("run", "plan"), help="run: train what is missing; plan: list it")
    parser.add_argument("--parts", default="".join(PARTS), help="which parts, e.g. AB (default: all)")
    parser.add_argument("--max-runs", type=int, default=None, help="in-process only")
    parser.add_argument("--executor", choices=("inprocess", "local", "slurm", "debug"), default="inprocess",
                        help="where runs train (dpeq_utils.sweep); default: one at a time in this process")
    parser.add_argument("--concurrency", type=int, default=1, help="local executor: runs at a time")
    args = parser.parse_args(argv)
    try:
        study = Study(args.profile, args.runs_dir, write_reference=args.write_reference,
                      resume_other_code=args.resume_other_code)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    parts = tuple(p for p in PARTS if p in args.parts.upper())
    with user_errors(parser.prog, args.debug):  # a bad record, no data, a locked run: one sentence, no traceback
        if args.command == "plan":
            records = study.records()
            _, waiting = study.plan(records)
            todo = study.missing(parts, records)
            print(f"{len(records)} records of profile {study.profile}; {len(todo)} runs can start now")
            for item in todo:
                print(f"  {item.part} {item.stage or '':5s} {item.label}")
            for line in sorted(set(waiting)):
                print(f"  waiting: {line}")
            return 0
        study.complete(parts, max_runs=args.max_runs, echo=lambda m: print(m, flush=True), executor=args.executor,
                       concurrency=args.concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
