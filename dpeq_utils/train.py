"""DP-SGD training: Poisson sampling, per-example gradients, clipping, noise, EMA, evaluation.

One logical step of DP-SGD (Abadi et al. 2016) as implemented here:

1. **Poisson sampling.** Every training example joins the batch independently with probability
   ``q = batch_size / N``; the batch size itself is random (expected ``batch_size``). This ``q`` and
   the number of steps are exactly what the accountant is given.
2. **Per-example gradients** of each example's loss averaged over its ``aug_mult`` views, computed in
   physical chunks of ``physical_batch_size`` examples (memory only: the Poisson batch and the views
   are drawn once per logical batch, so the chunking changes no random draw, only float32 rounding;
   ``tests/test_train.py`` checks it).
3. **Clipping** of each example's whole gradient to norm ``clip_norm``, then summing (Opacus
   ``DPOptimizer``, accumulating across the chunks).
4. **Noise** ``N(0, σ² clip_norm²)`` added once per logical step to the sum, which is divided by the
   *expected* batch size (dividing by the realised size would leak it) before the SGD update.
5. **EMA** of the weights updated once per logical step; evaluation reports raw and EMA weights.

The noise multiplier σ is calibrated before training for the target (ε, δ) and the run can take no
step beyond the calibrated number (:class:`dpeq_utils.privacy.PrivacyBudget`). ``non_private=True``
trains the same model on the same batches with the plain mean gradient: the reference line.

Run from the shell: ``python -m dpeq_utils train --profile smoke --set target_epsilon=3``.

Why one file of ~550 lines: the mechanism a reviewer checks — the Poisson sampler, per-example
clipping, the noise, the accountant's q and step count, the EMA, and what a checkpoint must hold to
resume it bit for bit — shares one :class:`RunState`; split, the DP step would be read in pieces.
Per-example gradients (:mod:`dpeq_utils.per_sample`), privacy accounting (:mod:`dpeq_utils.privacy`),
checkpoints (:mod:`dpeq_utils.checkpoint`) and records (:mod:`dpeq_utils.records`) live elsewhere.
"""

from __future__ import annotations

import contextlib
import math
import random
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.optimizers import DPOptimizer

from .config import MAX_STEPS, RunConfig
from .data import ImageDataset, Splits, apply_views, draw_views, load_splits
from .equivariance import evaluation_mode
from .machine import machine_kind
from .models import build_model, count_params
from .per_sample import per_sample_grads, resolve_engine
from .preflight import check_build_memory, check_memory
from .privacy import PrivacyBudget, PrivacyBudgetError
from .provenance import CODE
from .runtime import conv_layout, derived_seeds, phase, pick_device, release_free_memory, set_seed, tune_cpu_allocator
from .variants import Variant, build_variants


def planned_steps(config: RunConfig, dataset_size: int) -> int:
    """Logical steps of a run: ``update_steps``, or ``epochs`` worth of expected batches."""
    if config.update_steps is not None:
        return config.update_steps
    assert config.epochs is not None  # RunConfig guarantees exactly one of the two
    steps = max(1, round(config.epochs * dataset_size / config.batch_size))
    if steps > MAX_STEPS:  # refused before σ is calibrated for them
        raise ValueError(f"epochs={config.epochs:g} is {steps:,} steps of batch {config.batch_size} on {dataset_size:,} "
                         f"examples, more than the {MAX_STEPS:,} a run may take: lower epochs")
    return steps


def sample_rate(config: RunConfig, dataset_size: int) -> float:
    if config.batch_size > dataset_size:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {dataset_size} training examples; "
                         "lower batch_size (it is the expected Poisson batch, q = batch_size / N)")
    return config.batch_size / dataset_size


def poisson_batch(dataset_size: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of one Poisson-sampled logical batch: every example joins independently with
    probability ``sample_rate`` (the q the accountant is given); the batch size is random."""
    return torch.nonzero(torch.rand(dataset_size, generator=generator) < sample_rate).squeeze(1)


def budget_for(config: RunConfig, dataset_size: int) -> PrivacyBudget:
    """The privacy budget of a run of ``config`` on ``dataset_size`` examples: σ calibrated for its q
    and step count, and the steps it may take."""
    return PrivacyBudget(config.target_epsilon, config.target_delta, sample_rate(config, dataset_size),
                         planned_steps(config, dataset_size), config.accountant, dataset_size=dataset_size)


def noise_multiplier_for(config: RunConfig, dataset_size: int) -> float:
    """The σ a run of ``config`` on ``dataset_size`` examples trains with."""
    return budget_for(config, dataset_size).noise_multiplier


def build_model_for(config: RunConfig) -> nn.Module:
    return build_model(config.model, group=config.group, restrict=config.restrict, widths=config.widths,
                       num_groups=config.num_groups, head=config.head)


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


def evaluate(model: nn.Module, data: ImageDataset, device: torch.device, batch_size: int = 500) -> tuple[float, float]:
    """Accuracy and mean cross-entropy on ``data``, with the model's current parameters
    (:func:`~dpeq_utils.equivariance.evaluation_mode` rebuilds escnn's cached filters)."""
    correct, loss = 0, 0.0
    with evaluation_mode(model):
        for start in range(0, len(data), batch_size):
            index = slice(start, start + batch_size)
            logits = model(conv_layout(data.normalized(index, device)))
            labels = data.labels[index].to(device)
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(1) == labels).sum())
    return correct / len(data), loss / len(data)


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


@dataclass
class RunState:
    """Everything a run is while it trains: what :func:`setup` builds, :func:`train_step` advances,
    :func:`evaluate_run` scores and :func:`summary` turns into a record's results. Its
    :meth:`state_dict` is what a checkpoint holds (:mod:`dpeq_utils.checkpoint`)."""

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
        """The run's progress: enough to continue it bit for bit on the same device and libraries."""
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
            "global_generators": global_generator_states(),
            "variants": [variant.state_dict() for variant in self.variants],
            "history": self.history, "batch_sizes": self.batch_sizes,
            "train_time_s": self.train_time_s, "wall_time_s": self.wall_time_s, "resumes": self.resumes,
            "code_history": self.code_history, "machine_history": self.machine_history,
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(state["parameters"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        for decay, average in self.horizons.items():
            average.load_state_dict(state["horizons"][decay])
        for name, generator in self.generators.items():
            if name in state["generators"] and not (self.config.secure_noise and name in SECRET_STREAMS):
                generator.set_state(state["generators"][name])
            # else: a secure run's secret stream, freshly seeded from the OS by setup (not repeatable), never from a file
        set_global_generator_states(state["global_generators"])
        for variant, variant_state in zip(self.variants, state["variants"], strict=True):
            variant.load_state_dict(variant_state)
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


#: The streams whose draws, if known, would undo the guarantee: the Poisson sampler (each example's
#: membership of each batch: the amplification by subsampling that ε relies on assumes it is secret),
#: the augmentation (which views were seen) and the noise (which could be regenerated and subtracted).
#: In a secure run (``secure_noise``) they come from the OS's entropy and their states are never
#: written to a checkpoint; the variants' stream (pruning masks drawn before training, coordinates
#: dropped at random) does not depend on the data and stays seeded.
SECRET_STREAMS = ("sampler", "augment", "noise")


def global_generator_states() -> dict:
    """Python's, NumPy's and torch's global generators (dpeq draws from its own streams, but a
    library may use these)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    # NumPy's state as plain values and a tensor: checkpoints load with torch.load(weights_only=True),
    # which admits no NumPy array (dpeq_utils.checkpoint)
    numpy_state = {"name": name, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "position": int(position),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_global_generator_states(states: dict) -> None:
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def setup(config: RunConfig, data: Splits | None = None, force_memory: bool = False) -> RunState:
    """Load the data, calibrate the budget, build the model, optimiser, streams, variants and EMAs:
    a run at step 0. On a CPU the run's memory is estimated first and a run that would not fit is
    refused unless ``force_memory`` (:mod:`dpeq_utils.preflight`)."""
    started = time.perf_counter()
    set_seed(config.seed)
    device = pick_device(config.device)
    if device.type == "cpu":
        tune_cpu_allocator()
    splits = Splits(*data) if data is not None else load_splits(
        config.dataset, train_size=config.train_size, test_size=config.test_size,
        validation_size=config.validation_size, seed=config.seed)
    if config.validation_size and splits.validation is None:
        raise ValueError("the data passed to train() has no validation split, but the config asks for one")
    n = len(splits.train)
    q = sample_rate(config, n)
    steps = planned_steps(config, n)
    budget = None if config.non_private else budget_for(config, n)
    check_build_memory(config, force=force_memory)  # from the widths, before escnn expands any filter
    model = build_model_for(config).to(device)
    model.train()
    if device.type == "cpu":
        check_memory(config, model, sum(len(part) for part in splits if part is not None), force=force_memory)
    # a fourth stream for the variants; the first three are unchanged by asking for it (SeedSequence prefixes)
    seeds = dict(zip(("sampler", "augment", "noise", "variants"), derived_seeds(config.seed, 4)))
    if config.secure_noise:  # every stream that touches private data from the OS (SECRET_STREAMS)
        seeds.update({name: secrets.randbits(63) for name in SECRET_STREAMS})
    generators = {"sampler": torch.Generator().manual_seed(seeds["sampler"]),
                  "augment": torch.Generator().manual_seed(seeds["augment"]),  # CPU: the same views on every device
                  "noise": torch.Generator(device=device).manual_seed(seeds["noise"]),
                  "variants": torch.Generator(device=device).manual_seed(seeds["variants"])}
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    if budget is not None:
        optimizer = DPOptimizer(optimizer, noise_multiplier=budget.noise_multiplier, max_grad_norm=config.clip_norm,
                                expected_batch_size=config.batch_size, loss_reduction="mean",
                                generator=generators["noise"])
    variants = build_variants(config, model, generators["variants"])  # prunes now
    return RunState(config=config, device=device, splits=splits, sample_rate=q, steps=steps, budget=budget,
                    machine_history=[{"from_step": 0, "machine": machine_kind(device)}],
                    model=model, optimizer=optimizer, generators=generators, variants=variants,
                    ema=WeightEMA(model, config.ema_decay),
                    horizons={decay: WeightEMA(model, decay) for decay in config.ema_horizons},
                    engine=resolve_engine(config.per_sample_engine, model), started=started)


def train_step(state: RunState) -> list[float]:
    """One logical step: spend it from the budget, draw the Poisson batch and its views, update,
    average. Returns every example's training loss."""
    step_started = time.perf_counter()
    config, train_data, device = state.config, state.splits.train, state.device
    if state.budget is not None:
        state.budget.spend()
    for variant in state.variants:
        variant.begin_step(state.model)
    n = len(train_data)
    chosen = poisson_batch(n, state.sample_rate, state.generators["sampler"])
    state.batch_sizes.append(len(chosen))
    draws = draw_views(len(chosen), config.aug_mult, state.generators["augment"])  # once per logical batch
    chunk = config.physical_batch_size
    starts = range(0, len(chosen), chunk) if len(chosen) else [0]
    batches = ((apply_views(train_data.normalized(chosen[i:i + chunk], device), draws[i:i + chunk]),
                train_data.labels[chosen[i:i + chunk]].to(device)) for i in starts)
    losses = logical_step(state.model, state.optimizer, batches, len(starts), private=state.private,
                          batch_size=len(chosen), engine=state.engine, variants=state.variants)
    state.ema.update(state.model)
    for average in state.horizons.values():
        average.update(state.model)
    state.step += 1
    state.train_time_s += time.perf_counter() - step_started
    return losses


def evaluate_run(state: RunState) -> dict:
    """Score the raw weights, the EMA and the further EMAs on the test set; append it to the history."""
    eval_started = time.perf_counter()
    model, test_data, device = state.model, state.splits.test, state.device
    accuracy, loss = evaluate(model, test_data, device)
    with swapped_parameters(model, state.ema.values):
        accuracy_ema, loss_ema = evaluate(model, test_data, device)
    other_horizons = {}
    for decay, average in state.horizons.items():
        with swapped_parameters(model, average.values):
            other_horizons[f"{decay:g}"] = evaluate(model, test_data, device)[0]
    # the training loss is not stored: a mean over private batches without noise is not a DP release
    entry = {"step": state.step, "epsilon": state.budget.epsilon() if state.budget else None,
             "test_accuracy": accuracy, "test_loss": loss, "test_accuracy_ema": accuracy_ema,
             "test_loss_ema": loss_ema, **({"test_accuracy_ema_horizons": other_horizons} if state.horizons else {}),
             "elapsed_s": state.wall_time_s, "eval_time_s": time.perf_counter() - eval_started}
    state.history.append(entry)
    return entry


def summary(state: RunState) -> dict:
    """The results of a finished run: the final evaluation (and validation), the privacy audit, the
    variants' fields. Raises :class:`PrivacyBudgetError` if the run did not take exactly its planned
    steps within its budget."""
    config, model, device = state.config, state.model, state.device
    train_data, test_data, validation_data = state.splits
    final = evaluate_run(state)
    validation = {}
    if validation_data is not None:  # the split learning rates are chosen on; the test set is never used for that
        validation["val_accuracy"], validation["val_loss"] = evaluate(model, validation_data, device)
        with swapped_parameters(model, state.ema.values):
            validation["val_accuracy_ema"], validation["val_loss_ema"] = evaluate(model, validation_data, device)
    if device.type == "cpu":
        release_free_memory()  # the allocator kept the run's peak (tune_cpu_allocator); the next run starts lean
    epsilon = None
    if state.budget is not None:
        epsilon = state.budget.epsilon()
        if state.budget.steps_taken != state.steps or state.step != state.steps or epsilon > config.target_epsilon:
            raise PrivacyBudgetError(f"internal error: took {state.budget.steps_taken} of {state.steps} steps, "
                                     f"ε={epsilon} (target {config.target_epsilon}); the run is discarded")
    variant_fields = {"kept_params": count_params(model), "mean_updated_fraction": 1.0}
    for variant in state.variants:
        variant_fields.update(variant.summary(model))
    return {
        "noise_multiplier": state.budget.noise_multiplier if state.budget else 0.0,
        "sample_rate": state.sample_rate,
        "steps": state.steps,
        "epsilon_spent": epsilon,
        "dataset_size": len(train_data),
        # a secure run publishes no fingerprint of its private training data
        "data": {"origin": train_data.meta.get("origin"), "verified": train_data.meta.get("verified"),
                 **({} if config.secure_noise else {"train_sha256": train_data.digest()}),
                 "test_sha256": test_data.digest()},
        "test_size": len(test_data),
        "mean_batch_size": float(np.mean(state.batch_sizes)),
        "test_accuracy": final["test_accuracy"],
        "test_accuracy_ema": final["test_accuracy_ema"],
        "test_loss": final["test_loss"],
        **({"test_accuracy_ema_horizons": final["test_accuracy_ema_horizons"]} if state.horizons else {}),
        **validation,
        "num_params": count_params(model),
        **variant_fields,
        "epochs": state.steps * state.sample_rate,
        "per_sample_engine": state.engine if state.private else None,  # the engine that ran ("auto" resolved)
        "train_time_s": state.train_time_s,  # the step loop alone: sampling, gradients, updates (no evaluation)
        "wall_time_s": state.wall_time_s,  # over every process of a resumed run
        **({"resumed_at_steps": state.resumes} if state.resumes else {}),
        **({"code_history": state.code_history} if len(state.code_history) > 1 else {}),
        "machine": state.machine_history[-1]["machine"],
        **({"machine_history": state.machine_history} if len(state.machine_history) > 1 else {}),
        "history": state.history,
    }


def train(config: RunConfig, *, progress: bool = True, data: Splits | None = None, force_memory: bool = False,
          checkpoints=None) -> dict:
    """Train one run and return its results (the body of a run record, without provenance).

    ``data`` lets a caller pass already loaded :class:`~dpeq_utils.data.Splits` (or a (train, test)
    pair); otherwise they are loaded from ``config``. ``checkpoints``: see :func:`fit`.
    """
    return fit(config, progress=progress, data=data, force_memory=force_memory, checkpoints=checkpoints)[1]


def fit(config: RunConfig, *, progress: bool = True, data: Splits | None = None, force_memory: bool = False,
        checkpoints=None) -> tuple[nn.Module, dict]:
    """:func:`train`, also returning the trained model (its raw weights, not the EMA).

    ``checkpoints`` (a :class:`dpeq_utils.checkpoint.Checkpoints`, or None) resumes the run from its
    checkpoint, saves one as ``config.checkpoint_every`` asks, and on SIGINT, SIGTERM or SIGUSR2
    saves one at the end of the current step before the signal takes its usual course.
    """
    from tqdm import tqdm  # text, not a widget: it renders in static notebooks too

    state = setup(config, data, force_memory)
    if checkpoints is not None:
        checkpoints.resume(state)
    if config.eval_every and state.step == 0:  # the learning curve starts where training starts
        evaluate_run(state)
    bar = tqdm(total=state.steps, initial=state.step, disable=not progress, leave=False,
               desc=f"{config.model} {'DP-SGD' if state.private else 'non-private'}")
    with deferred_signals(active=checkpoints is not None) as signals:
        while state.step < state.steps:
            losses = train_step(state)
            bar.update()
            if losses:
                bar.set_postfix(loss=f"{math.fsum(losses) / len(losses):.3f}", refresh=False)
            if config.eval_every and state.step % config.eval_every == 0 and state.step != state.steps:
                evaluate_run(state)
            if checkpoints is not None:
                checkpoints.after_step(state, signalled=signals.pending is not None)
                signals.deliver()
    bar.close()
    return state.model, summary(state)


class deferred_signals(contextlib.AbstractContextManager):
    """Hold SIGINT, SIGTERM and SIGUSR2 until the end of the current step (where a checkpoint can be
    written), then hand each to the handler it had before (Ctrl-C's KeyboardInterrupt, the default
    termination, submitit's requeue on Slurm). Only in the main thread; elsewhere nothing is held."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR2") if hasattr(signal, name))

    def __init__(self, active: bool = True):
        self.active = active
        self.pending: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self):
        if self.active and threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                if signal.getsignal(number) is not signal.SIG_IGN:
                    self.previous[number] = signal.signal(number, self._hold)
        return self

    def _hold(self, number, frame):
        self.pending = number

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}
        return False

    def deliver(self) -> None:
        """Restore the old handlers and raise the held signal again (if one arrived)."""
        if self.pending is None:
            return
        number, self.pending = self.pending, None
        self.__exit__(None, None, None)
        signal.raise_signal(number)


def logical_step(model: nn.Module, optimizer, batches, num_chunks: int, private: bool, batch_size: int,
                 engine: str = "auto", variants=()) -> list[float]:
    """One update from a logical batch given as ``num_chunks`` physical chunks of ``(views, labels)``.

    Private: per-example gradients of every chunk (by ``engine``, see :mod:`dpeq_utils.per_sample`)
    go to Opacus's ``DPOptimizer``, which clips and sums them; after the last chunk it adds the
    noise and divides by the expected batch size (``pre_step``). Non-private: the mean gradient over
    the ``batch_size`` examples. Then, for both, the variants' ``before_update`` and the SGD update.
    ``variants`` (:mod:`dpeq_utils.variants`) also restrict the per-example gradients before
    clipping. Returns every example's training loss (mean over its views).
    """
    losses = []
    update_ready = not private and batch_size > 0
    for i, (views, labels) in enumerate(batches):
        if private:
            losses += _store_per_sample_gradients(model, views, labels, engine, variants)
            with phase("clip, sum, noise"):
                optimizer.signal_skip_step(do_skip=i < num_chunks - 1)
                update_ready = optimizer.pre_step()  # clip and sum; on the last chunk also noise and scaling
                if not update_ready:
                    optimizer.zero_grad(set_to_none=True)  # drops this chunk's per-example gradients, keeps the sum
        else:
            losses += _accumulate_plain_gradient(model, views, labels, batch_size)
    with phase("update"):
        if update_ready:
            for variant in variants:
                variant.before_update(model)
            getattr(optimizer, "original_optimizer", optimizer).step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def _store_per_sample_gradients(model: nn.Module, views: torch.Tensor, labels: torch.Tensor,
                                engine: str = "auto", variants=()) -> list[float]:
    """Put each example's gradient into ``p.grad_sample`` for Opacus's DPOptimizer to clip, restricted
    to the coordinates the variants keep this step (so the clipping norm counts only those)."""
    if len(views) == 0:  # an empty Poisson batch still gets its noise step
        for p in model.parameters():
            p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]  # Opacus's per-example slot
        return []
    grads, example_losses = per_sample_grads(model, views, labels, engine)
    for name, p in model.named_parameters():
        grad = grads[name]
        for variant in variants:
            mask = variant.gradient_mask(name)
            if mask is not None:
                grad = grad * mask
        p.grad_sample = grad  # type: ignore[attr-defined]
    return example_losses.detach().tolist()


def _accumulate_plain_gradient(model: nn.Module, views: torch.Tensor, labels: torch.Tensor, batch_size: int) -> list[float]:
    if len(views) == 0:
        return []
    batch, k = views.shape[:2]
    with phase("forward"):
        logits = model(conv_layout(views.flatten(0, 1)))
        per_example = F.cross_entropy(logits, labels.repeat_interleave(k), reduction="none").view(batch, k).mean(1)
    with phase("backward"):
        (per_example.sum() / batch_size).backward()
    return per_example.detach().tolist()


# ----------------------------------------------------------------------------------------------
# command line


if __name__ == "__main__":  # python -m dpeq_utils.train: an alias of python -m dpeq_utils train (dpeq_utils.runs)
    from .runs import main

    sys.exit(main())
