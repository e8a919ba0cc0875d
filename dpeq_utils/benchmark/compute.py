"""The compute of the published recipes: cost per example-view gradient of each recipe's model with
its views, measured in one benchmark run, and the file the report reads.
"""

from __future__ import annotations

import torch

from ..machine import machine_description
from ..runtime import (
    device_name,
    pick_device,
)
from .measure import benchmark_model, reference_speeds

#: Where the compute comparison the report prints is recorded (one benchmark run, see :func:`compute_record`).
COMPUTE_RECORD = "benchmark/compute.json"


def compute_record(batch: int = 64, repeats: int = 5, device: str = "auto") -> dict:
    """The cost of one DP example-view gradient of each published recipe's model with that recipe's
    views (the paper: eq_resnet9 with 4 views; De et al.: wrn16_4 with 16), measured the same way in
    this one process: the median time of the trainer's whole DP step (per-example gradients, clip,
    noise, update) at physical batch ``batch``, divided by batch × views. Run it on an otherwise idle
    machine (the record describes the machine and the reference kernels' speed before and after)."""
    from ..config import config_from_profile
    from ..provenance import CODE

    dev = pick_device(device)
    recipes = {"paper": config_from_profile("paper"), "de_et_al_eps8": config_from_profile("paper", "de_et_al_eps8")}
    before = reference_speeds(dev)
    models = {}
    for name, recipe in recipes.items():
        dp = next(m for m in benchmark_model(recipe.model, batch, engines=(), views=recipe.aug_mult, repeats=repeats,
                                             device=device) if m.kind == "dp_step")
        models[name] = {"model": recipe.model, "views": recipe.aug_mult, "physical_batch": batch,
                        "dp_step_seconds": dp.seconds, "ms_per_example_view": 1000 * dp.seconds / (batch * recipe.aug_mult),
                        "steps": recipe.update_steps, "batch_size": recipe.batch_size}
    after = reference_speeds(dev)
    return {"recipes": models, "device": device_name(dev), "machine": machine_description(dev),
            "torch_threads": torch.get_num_threads(), "reference_speeds": {"start": before, "end": after},
            "git_commit": CODE["git_commit"], "source_sha256": CODE["source_sha256"]}
