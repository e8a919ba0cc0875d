"""The state of a run while it trains, and what a checkpoint saves and restores of it.

:class:`RunState` is everything a run is between two steps: the model and optimiser, the privacy
budget, the random streams, the EMAs, the variants (pruning masks, ModelMix's previous iterate), the
history. :meth:`RunState.state_dict` is what a checkpoint holds (:mod:`dpeq_utils.checkpoint`);
:meth:`RunState.load_state_dict` puts it back **on the run's device**: a checkpoint is read onto the
CPU, and everything the step computes with (parameters, EMAs, variants' tensors, optimiser state)
is moved to where the run trains, while generator states stay host tensors (as ``set_state``
takes them). Streams that would undo the guarantee if known (:data:`SECRET_STREAMS`) are never
written for a secure run.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from .config import RunConfig
from .data import Splits
from .privacy import PrivacyBudget
from .provenance import CODE
from .runtime import to_device
from .variants import Variant

#: The streams whose draws, if known, would undo the guarantee: the Poisson sampler (each example's
#: membership of each batch: the amplification by subsampling that ε relies on assumes it is secret),
#: the augmentation (which views were seen) and the noise (which could be regenerated and subtracted).
#: In a secure run (``secure_noise``) they come from the OS's entropy and their states are never
#: written to a checkpoint; the variants' stream (pruning masks drawn before training, coordinates
#: dropped at random) does not depend on the data and stays seeded.
SECRET_STREAMS = ("sampler", "augment", "noise")


class WeightEMA:
    """Exponential moving average of the parameters, one update per logical step.

    The decay is warmed up as ``min(decay, (1 + t) / (10 + t))`` (as TensorFlow's EMA with
    ``num_updates``), so short runs are not dominated by the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.values = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in model.named_parameters():
            self.values[name].mul_(decay).add_(p.detach(), alpha=1 - decay)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"values": self.values, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.values = {name: value.clone() for name, value in state["values"].items()}
        self.updates = state["updates"]


@contextlib.contextmanager
def swapped_parameters(model: nn.Module, values: dict[str, torch.Tensor]):
    """Temporarily load ``values`` (e.g. the EMA) into the model's parameters."""
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(values[name])
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(saved[name])


@dataclass
class RunState:
    """Everything a run is while it trains: what :func:`dpeq_utils.train.setup` builds,
    :func:`~dpeq_utils.train.train_step` advances, :func:`~dpeq_utils.train.evaluate_run` scores and
    :func:`~dpeq_utils.train.summary` turns into a record's results. Its :meth:`state_dict` is what a
    checkpoint holds (:mod:`dpeq_utils.checkpoint`)."""

    config: RunConfig
    device: torch.device
    splits: Splits
    sample_rate: float
    steps: int
    budget: PrivacyBudget | None
    model: nn.Module
    optimizer: torch.optim.Optimizer  # Opacus's DPOptimizer around SGD when private
    generators: dict[str, torch.Generator]  # sampler, augment, noise, variants: one stream each
    variants: list[Variant]
    ema: WeightEMA
    horizons: dict[float, WeightEMA]  # further EMAs, scored only, never trained on
    engine: str
    step: int = 0
    history: list[dict] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    train_time_s: float = 0.0  # the step loop alone (sampling, gradients, updates), over every process of the run
    earlier_wall_time_s: float = 0.0  # wall time of earlier processes of a resumed run
    resumes: list[int] = field(default_factory=list)  # the steps a resumed run continued from
    # the code each stretch of the run was trained with (dpeq_utils.provenance): one entry, unless
    # the user let a checkpoint written by other code continue
    code_history: list[dict] = field(default_factory=lambda: [{"from_step": 0, **CODE}])
    # the machine each stretch of the run was trained on (dpeq_utils.machine): one entry, unless the
    # run was resumed on another kind of machine (CPU kernels round differently across vector units)
    machine_history: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    @property
    def private(self) -> bool:
        return self.budget is not None

    @property
    def wall_time_s(self) -> float:
        return self.earlier_wall_time_s + time.perf_counter() - self.started

    def state_dict(self) -> dict:
        """The run's progress: enough to continue it bit for bit on the same kind of device, with the
        same libraries and code."""
        return {
            "step": self.step,
            "steps_taken": self.budget.steps_taken if self.budget else self.step,
            "parameters": {name: p.detach().clone() for name, p in self.model.named_parameters()},
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict(),
            "horizons": {decay: average.state_dict() for decay, average in self.horizons.items()},
            # a secure run's secret streams stay in memory: from their states its batches and noise could be rebuilt
            "generators": {name: g.get_state() for name, g in self.generators.items()
                           if not (self.config.secure_noise and name in SECRET_STREAMS)},
            "global_generators": global_generator_states(self.device),
            "variants": [variant.state_dict() for variant in self.variants],
            "history": self.history, "batch_sizes": self.batch_sizes,
            "train_time_s": self.train_time_s, "wall_time_s": self.wall_time_s, "resumes": self.resumes,
            "code_history": self.code_history, "machine_history": self.machine_history,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (read onto the CPU): what the step computes with goes to this run's device."""
        device = self.device
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(state["parameters"][name])
        self.optimizer.load_state_dict(state["optimizer"])  # torch moves its state to each parameter's device
        self.ema.load_state_dict(to_device(state["ema"], device))
        for decay, average in self.horizons.items():
            average.load_state_dict(to_device(state["horizons"][decay], device))
        for name, generator in self.generators.items():
            if name in state["generators"] and not (self.config.secure_noise and name in SECRET_STREAMS):
                generator.set_state(state["generators"][name])
            # else: a secure run's secret stream, freshly seeded from the OS by setup (not repeatable), never from a file
        set_global_generator_states(state["global_generators"], device)
        for variant, variant_state in zip(self.variants, state["variants"], strict=True):
            variant.load_state_dict(variant_state)  # each variant puts its tensors where its own live
        self.step = state["step"]
        if self.budget is not None:
            self.budget.steps_taken = state["steps_taken"]
        self.history, self.batch_sizes = list(state["history"]), list(state["batch_sizes"])
        self.train_time_s, self.earlier_wall_time_s = state["train_time_s"], state["wall_time_s"]
        self.resumes = list(state["resumes"])
        self.code_history = [dict(entry) for entry in state["code_history"]]
        if self.code_history[-1]["source_sha256"] != CODE["source_sha256"]:  # allowed by the caller
            self.code_history.append({"from_step": self.step, **CODE})
        here = self.machine_history[-1]["machine"]
        self.machine_history = [dict(entry) for entry in state.get("machine_history", [])] or self.machine_history
        if self.machine_history[-1]["machine"] != here:
            self.machine_history.append({"from_step": self.step, "machine": here})
        self.started = time.perf_counter()


def global_generator_states(device: torch.device | None = None) -> dict:
    """Python's, NumPy's and torch's global generators, and the run's GPU's (dpeq draws from its own
    streams, but a library may use these)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    # NumPy's state as plain values and a tensor: checkpoints load with torch.load(weights_only=True),
    # which admits no NumPy array (dpeq_utils.checkpoint)
    numpy_state = {"name": name, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "position": int(position),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        # the run's GPU only: a run resumed where fewer (or other) GPUs are visible restores it into its
        # own device, never into an ordinal that may not exist there
        states["cuda_device"] = torch.cuda.get_rng_state(device)
    return states


def set_global_generator_states(states: dict, device: torch.device | None = None) -> None:
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda_device" in states and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda_device"], device)
