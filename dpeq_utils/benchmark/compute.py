"""The compute of the published recipes: the cost of one DP example-view gradient of each recipe's
model with its views, measured in interleaved rounds in one process, and the file the report reads.
"""

from __future__ import annotations

import statistics

import torch

from ..machine import machine_description
from ..runtime import device_name, pick_device
from .measure import _step_calls, _timed, _warm_up, reference_speeds

#: Where the compute comparison the report prints is recorded (one benchmark run, see :func:`compute_record`).
COMPUTE_RECORD = "benchmark/compute.json"
#: The recipes compared, in the order they are timed in a round: the paper's (the equivariant
#: ResNet-9 with 4 views), De et al.'s ε = 8 setting with WRN-16-4 (16 views), and the same setting
#: with WRN-40-4, the model behind the paper's parameter ratio (De et al.'s headline model).
RECIPES = ("paper", "de_et_al_eps8", "de_et_al_eps8_wrn40_4")


def _recipes():
    from ..config import config_from_profile
    from ..models import WideResNet

    de_et_al = config_from_profile("paper", "de_et_al_eps8")
    return {"paper": (config_from_profile("paper"), None, "eq_resnet9"),
            "de_et_al_eps8": (de_et_al, None, "wrn16_4"),
            "de_et_al_eps8_wrn40_4": (de_et_al, lambda: WideResNet(depth=40, width=4), "wrn40_4")}


def compute_record(example_views: int = 256, rounds: int = 5, device: str = "auto", recipes=RECIPES) -> dict:
    """The cost of one DP example-view gradient of each recipe's model with that recipe's views: the
    trainer's whole DP step (per-example gradients, clip, noise, update) on ``example_views`` example-views
    (``example_views // views`` examples), timed once per recipe in each of ``rounds`` rounds, the order
    of the recipes reversed every other round, all in this one process after a warm-up of each. A
    shared or drifting machine slows a whole round; the ratio of two recipes within one round shares
    that drift, so the record keeps every round's figures (median and range in the report). Run it
    on an otherwise idle machine: the record describes the machine and its speed on reference
    kernels before and after."""
    from ..models import count_params
    from ..provenance import CODE

    dev = pick_device(device)
    known = _recipes()
    steps = {}
    for name in recipes:
        recipe, build, label = known[name]
        batch = max(1, example_views // recipe.aug_mult)
        calls, model = _step_calls(recipe.model, batch, engines=(), views=recipe.aug_mult, device=dev,
                                   model=None if build is None else build(), seed=0)
        _warm_up(calls["dp_step"], dev)
        steps[name] = {"call": calls["dp_step"], "batch": batch, "recipe": recipe, "model": label,
                       "params": count_params(model)}
    before = reference_speeds(dev)
    seconds: dict[str, list[float]] = {name: [] for name in recipes}
    for index in range(rounds):
        for name in (recipes if index % 2 == 0 else tuple(reversed(recipes))):
            seconds[name].append(_timed(steps[name]["call"], dev))
    after = reference_speeds(dev)
    measured = {}
    for name, step in steps.items():
        views = step["batch"] * step["recipe"].aug_mult
        per_view = [1000 * s / views for s in seconds[name]]
        measured[name] = {"model": step["model"], "parameters": step["params"], "views": step["recipe"].aug_mult,
                          "physical_batch": step["batch"], "dp_step_seconds": seconds[name],
                          "ms_per_example_view": statistics.median(per_view), "ms_per_example_view_rounds": per_view,
                          "steps": step["recipe"].update_steps, "batch_size": step["recipe"].batch_size}
    return {"recipes": measured, "rounds": rounds, "protocol": "interleaved rounds, order reversed every other round",
            "device": device_name(dev), "machine": machine_description(dev), "torch_threads": torch.get_num_threads(),
            "reference_speeds": {"start": before, "end": after},
            "git_commit": CODE["git_commit"], "source_sha256": CODE["source_sha256"]}
