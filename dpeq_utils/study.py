"""The evidence study: the paper's claims put to the test on real CIFAR-10 at the scale of a CPU.

Every run shares one budget (:data:`STUDY_RUN`): a 10,000-example training subset of CIFAR-10
(drawn with the run seed), 1,000 validation examples held out of the training set (the same for
every seed), a 2,000-example test subset, Poisson batches of 256 expected examples, 40 logical
steps (about one epoch), clip 2, no augmentation, EMA 0.99; δ = 1e-5 with the RDP accountant.

Parts (each a list of configs; a config's record is its result):

``A``  equal budget, different models, ε = 8: the paper's equivariant ResNet-9 (D4→D2), the
       parameter-matched plain ResNet-9, the same-width plain ResNet-9 and WRN-16-4. Learning rate
       per model chosen on the *validation* split from :data:`LR_GRID` (seed 0), then seeds 1 and 2
       at the chosen value.
``B``  accuracy against ε ∈ {1, 2, 3, 5} (8 is part A) and non-private, for the equivariant and the
       matched ResNet-9, seeds 0 and 1, at each model's ε = 8 learning rate; the non-private runs get
       their own learning rate from :data:`LR_GRID_NON_PRIVATE` on the validation split.
``C``  which symmetry: C1, C2, C4, C8, D1, D2, D8 (restricted to the halved subgroup where one
       exists; D4 is part A), and for D4 the two design ablations (no restriction; global head),
       seed 0, at the equivariant model's learning rate.
``D``  training length: 160 and 640 logical steps (σ recalibrated for each length) for the
       equivariant and the matched ResNet-9, seed 0, at their 40-step learning rates.

The test set is never used to choose anything. :func:`plan` turns the records that exist into the
next runs, so ``python -m dpeq_utils.study run`` can be stopped and restarted at any time and
trains only what is missing; records land in ``data/reference/teach/`` (shipped with the project).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig, config_from_profile
from .equivariance import can_halve
from .paths import data_dir

#: The shared budget of every study run (changes to the teach profile's run section).
STUDY_RUN = dict(dataset="cifar10", train_size=10_000, test_size=2_000, validation_size=1_000, batch_size=256,
                 physical_batch_size=64, update_steps=40, epochs=None, aug_mult=1, eval_every=0, ema_decay=0.99,
                 target_epsilon=8.0, clip_norm=2.0, model="eq_resnet9", group="D4", restrict=True, head="pool2x2",
                 seed=0)
LR_GRID = (0.5, 1.0, 2.0)
LR_GRID_NON_PRIVATE = (0.03, 0.1, 0.3)
SEEDS = (0, 1, 2)
MODELS_A = ("eq_resnet9", "resnet9_matched", "resnet9", "wrn16_4")
MODELS_B = ("eq_resnet9", "resnet9_matched")
EPSILONS_B = (1.0, 2.0, 3.0, 5.0)
SEEDS_B = (0, 1)
GROUPS_C = ("C1", "C2", "C4", "C8", "D1", "D2", "D8")
LENGTHS_D = (160, 640)


def reference_dir() -> Path:
    """Where the study's records are shipped."""
    return data_dir() / "reference" / "teach"


def base_config() -> RunConfig:
    return config_from_profile("teach", **STUDY_RUN).replace(profile="teach")


@dataclass(frozen=True)
class Planned:
    part: str  # "A-grid", "A-seeds", "B", "B-grid", "C", "D"
    label: str  # what the run is, for tables and logs
    config: RunConfig


def chosen_lr(records: dict[str, dict], candidates: list[RunConfig]) -> float | None:
    """The learning rate whose run has the best EMA validation accuracy (ties: the smaller rate);
    None until every candidate has a record."""
    from .runs import config_key

    results = [records.get(config_key(c)) for c in candidates]
    if any(r is None for r in results):
        return None
    best = max(zip(candidates, results), key=lambda cr: (cr[1]["val_accuracy_ema"], -cr[0].lr))
    return best[0].lr


def plan(records: dict[str, dict]) -> tuple[list[Planned], list[str]]:
    """Every run of the study that can be named now (in priority order), and the parts still
    waiting for a learning rate. ``records`` maps config keys to records."""
    base = base_config()
    planned: list[Planned] = []
    waiting: list[str] = []

    def grid(model: str, non_private: bool = False) -> list[RunConfig]:
        rates = LR_GRID_NON_PRIVATE if non_private else LR_GRID
        return [base.replace(model=model, lr=lr, non_private=non_private) for lr in rates]

    lrs: dict[tuple[str, bool], float | None] = {}
    for model in MODELS_A:
        for config in grid(model):
            planned.append(Planned("A-grid", f"{model} lr {config.lr}", config))
        lrs[(model, False)] = chosen_lr(records, grid(model))
    for model in MODELS_B:
        for config in grid(model, non_private=True):
            planned.append(Planned("B-grid", f"{model} non-private lr {config.lr}", config))
        lrs[(model, True)] = chosen_lr(records, grid(model, non_private=True))

    for model in MODELS_A:
        lr = lrs[(model, False)]
        if lr is None:
            waiting.append(f"A seeds of {model} (learning rate not chosen yet)")
            continue
        for seed in SEEDS[1:]:
            planned.append(Planned("A-seeds", f"{model} seed {seed}", base.replace(model=model, lr=lr, seed=seed)))
    for model in MODELS_B:
        lr, lr_np = lrs[(model, False)], lrs[(model, True)]
        if lr is None or lr_np is None:
            waiting.append(f"B runs of {model} (learning rate not chosen yet)")
            continue
        for seed in SEEDS_B:
            for eps in EPSILONS_B:
                planned.append(Planned("B", f"{model} ε {eps:g} seed {seed}",
                                       base.replace(model=model, lr=lr, seed=seed, target_epsilon=eps)))
            if seed != SEEDS[0]:  # seed 0 is the grid run at the chosen rate
                planned.append(Planned("B", f"{model} non-private seed {seed}",
                                       base.replace(model=model, lr=lr_np, seed=seed, non_private=True)))
    lr_eq = lrs[("eq_resnet9", False)]
    if lr_eq is None:
        waiting.append("C runs (the equivariant model's learning rate is not chosen yet)")
    else:
        for group in GROUPS_C:
            planned.append(Planned("C", f"{group}{' restricted' if can_halve(group) else ''}",
                                   base.replace(group=group, restrict=can_halve(group), lr=lr_eq)))
        planned.append(Planned("C", "D4 without restriction", base.replace(restrict=False, lr=lr_eq)))
        planned.append(Planned("C", "D4 with a global (invariant) head", base.replace(head="global", lr=lr_eq)))
    for steps in LENGTHS_D:
        for model in MODELS_B:
            lr = lrs[(model, False)]
            if lr is None:
                waiting.append(f"D runs of {model} (learning rate not chosen yet)")
                continue
            planned.append(Planned("D", f"{model} {steps} steps", base.replace(model=model, lr=lr, update_steps=steps)))
    return _deduplicated(planned), sorted(set(waiting))


def _deduplicated(planned: list[Planned]) -> list[Planned]:
    from .runs import config_key

    seen, unique = set(), []
    for item in planned:
        key = config_key(item.config)
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique


#: Order in which runs are trained: the main comparison first, so a study cut short still answers it.
PRIORITY = ("A-grid:eq_resnet9", "A-grid:resnet9_matched", "A-seeds:eq_resnet9", "A-seeds:resnet9_matched",
            "D160", "B-grid", "B:seed 0", "C", "B:seed 1", "A-grid:resnet9", "A-seeds:resnet9",
            "A-grid:wrn16_4", "A-seeds:wrn16_4", "D640")


def _priority(item: Planned) -> int:
    c = item.config
    names = {"A-grid": f"A-grid:{c.model}", "A-seeds": f"A-seeds:{c.model}", "B-grid": "B-grid", "C": "C",
             "B": f"B:seed {min(c.seed, 1)}", "D": f"D{c.update_steps}"}
    return PRIORITY.index(names[item.part])


def load_study_records(folder: Path | None = None) -> dict[str, dict]:
    from .runs import load_records

    folder = Path(folder) if folder is not None else reference_dir()
    if not folder.is_dir():
        return {}
    return {r["key"]: r for r in load_records(folder)}


def next_runs(records: dict[str, dict]) -> list[Planned]:
    from .runs import config_key

    planned, _ = plan(records)
    missing = [p for p in planned if config_key(p.config) not in records]
    return sorted(missing, key=_priority)


def run_study(folder: Path | None = None, max_runs: int | None = None, progress: bool = False) -> int:
    """Train missing runs one at a time (re-planning after each, as learning rates get chosen)."""
    from .data import load_splits
    from .runs import run

    folder = Path(folder) if folder is not None else reference_dir()
    cache: dict[tuple, object] = {}
    done = 0
    while max_runs is None or done < max_runs:
        todo = next_runs(load_study_records(folder))
        if not todo:
            break
        item = todo[0]
        c = item.config
        data_key = (c.dataset, c.train_size, c.test_size, c.validation_size, c.seed)
        if data_key not in cache:
            cache.clear()  # one seed's splits at a time: they are ~200 MB each
            cache[data_key] = load_splits(c.dataset, train_size=c.train_size, test_size=c.test_size,
                                          validation_size=c.validation_size, seed=c.seed)
        started = time.perf_counter()
        record = run(c, runs_dir=folder, progress=progress, data=cache[data_key])
        done += 1
        print(f"[study] {item.part:8s} {item.label:40s} val {record['val_accuracy_ema']:.3f} "
              f"test {record['test_accuracy']:.3f}/{record['test_accuracy_ema']:.3f} "
              f"({time.perf_counter() - started:.0f} s; {len(todo) - 1} left)", flush=True)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpeq_utils.study", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="train the missing runs (resumable; records land in --runs-dir)")
    run_parser.add_argument("--runs-dir", default=None, help="default: data/reference/teach")
    run_parser.add_argument("--max-runs", type=int, default=None)
    plan_parser = sub.add_parser("plan", help="list the runs still missing, in the order they would be trained")
    plan_parser.add_argument("--runs-dir", default=None)
    args = parser.parse_args(argv)
    folder = Path(args.runs_dir) if args.runs_dir else None
    if args.command == "plan":
        records = load_study_records(folder)
        _, waiting = plan(records)
        todo = next_runs(records)
        print(f"{len(records)} records; {len(todo)} runs can start now; waiting: {waiting or 'nothing'}")
        for item in todo:
            print(f"  {item.part:8s} {item.label}")
        return 0
    run_study(folder, args.max_runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
