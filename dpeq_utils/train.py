"""DP-SGD training, one run: set it up, step it, score it, summarise it.

One logical step of DP-SGD (Abadi et al. 2016) as implemented here:

1. **Poisson sampling.** Every training example joins the batch independently with probability
   ``q = batch_size / N``; the batch size itself is random (expected ``batch_size``). This ``q`` and
   the number of steps are exactly what the accountant is given (:mod:`dpeq_utils.batches`).
2. **Per-example gradients** of each example's loss averaged over its ``aug_mult`` views, computed in
   physical chunks of ``physical_batch_size`` examples (memory only: the Poisson batch and the views
   are drawn once per logical batch, so the chunking changes no random draw, only float32 rounding;
   ``tests/test_train.py`` checks it).
3. **Clipping** of each example's whole gradient to norm ``clip_norm``, then summing (Opacus
   ``DPOptimizer``, accumulating across the chunks; :mod:`dpeq_utils.dp_step`).
4. **Noise** ``N(0, σ² clip_norm²)`` added once per logical step to the sum, which is divided by the
   *expected* batch size (dividing by the realised size would leak it) before the SGD update.
5. **EMA** of the weights updated once per logical step; evaluation reports raw and EMA weights.

The noise multiplier σ is calibrated before training for the target (ε, δ) and the run can take no
step beyond the calibrated number (:class:`dpeq_utils.privacy.PrivacyBudget`). ``non_private=True``
trains the same model on the same batches with the plain mean gradient: the reference line.

The rooms, along the way the data flows: :mod:`dpeq_utils.batches` (the sampler, the views, the
chunks on the device), :mod:`dpeq_utils.dp_step` (one logical step on those chunks),
:mod:`dpeq_utils.run_state` (the run's state, what a checkpoint saves and restores, on which device),
and this module (a run around them: :func:`setup`, :func:`train_step`, :func:`evaluate_run`,
:func:`summary`, :func:`fit`). Per-example gradients (:mod:`dpeq_utils.per_sample`), privacy
accounting (:mod:`dpeq_utils.privacy`), checkpoints (:mod:`dpeq_utils.checkpoint`) and records
(:mod:`dpeq_utils.records`) live elsewhere.

On a GPU: the training and test sets are placed on the device once, a step reads nothing back from
the device, TF32 and deterministic algorithms are set explicitly from the config (``allow_tf32``,
``deterministic``) and named in the record's ``machine``, and the run's memory on the device is
checked before the first step (:mod:`dpeq_utils.preflight`).

Run from the shell: ``python -m dpeq_utils train --profile smoke --set target_epsilon=3``.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import threading
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.optimizers import DPOptimizer

from .batches import physical_chunks, planned_steps, poisson_batch, sample_rate
from .config import RunConfig
from .data import ImageDataset, Splits, load_splits
from .dp_step import logical_step
from .equivariance import evaluation_mode
from .machine import machine_kind
from .models import build_model, count_params
from .per_sample import resolve_engine
from .preflight import check_build_memory, check_memory
from .privacy import PrivacyBudget, PrivacyBudgetError
from .run_state import SECRET_STREAMS, RunState, WeightEMA, swapped_parameters
from .runtime import (
    configure_device,
    conv_layout,
    derived_seeds,
    pick_device,
    release_free_memory,
    set_seed,
    synchronize,
    tune_cpu_allocator,
)
from .variants import build_variants


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


def evaluate(model: nn.Module, data: ImageDataset, device: torch.device, batch_size: int = 500) -> tuple[float, float]:
    """Accuracy and mean cross-entropy on ``data``, with the model's current parameters
    (:func:`~dpeq_utils.equivariance.evaluation_mode` rebuilds escnn's cached filters). On a GPU the
    data is placed on the device once and the sums are read back once, at the end."""
    losses, hits = [], []
    placed = data.on(device)
    with evaluation_mode(model):
        for start in range(0, len(data), batch_size):
            index = slice(start, start + batch_size)
            logits = model(conv_layout(placed.normalized(index)))
            labels = placed.labels[index]
            losses.append(F.cross_entropy(logits, labels, reduction="sum"))
            hits.append((logits.argmax(1) == labels).sum())
    loss = 0.0
    for value in torch.stack(losses).cpu().tolist():  # one read-back; added one by one in float64, as always
        loss += value
    return sum(torch.stack(hits).cpu().tolist()) / len(data), loss / len(data)


def setup(config: RunConfig, data: Splits | None = None, force_memory: bool = False) -> RunState:
    """Load the data, calibrate the budget, build the model, optimiser, streams, variants and EMAs:
    a run at step 0. The run's memory (host RAM on a CPU, device memory on a GPU) is estimated first
    and a run that would not fit is refused unless ``force_memory`` (:mod:`dpeq_utils.preflight`)."""
    started = time.perf_counter()
    set_seed(config.seed)
    device = pick_device(config.device)
    configure_device(device, allow_tf32=config.allow_tf32, deterministic=config.deterministic)
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
    check_memory(config, model, splits, device, force=force_memory)
    for part in splits:  # on a GPU, the data is placed on the device once (nothing happens on a CPU)
        if part is not None:
            part.on(device)
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


def train_step(state: RunState) -> torch.Tensor:
    """One logical step: spend it from the budget, draw the Poisson batch and its views, update,
    average. Returns every example's training loss (a tensor on the run's device)."""
    step_started = time.perf_counter()
    config = state.config
    if state.budget is not None:
        state.budget.spend()
    for variant in state.variants:
        variant.begin_step(state.model)
    chosen = poisson_batch(len(state.splits.train), state.sample_rate, state.generators["sampler"])
    state.batch_sizes.append(len(chosen))
    chunks, count = physical_chunks(state.splits.train, chosen, config.aug_mult, config.physical_batch_size,
                                    state.generators["augment"], state.device)
    losses = logical_step(state.model, state.optimizer, chunks, count, private=state.private,
                          batch_size=len(chosen), engine=state.engine, variants=state.variants)
    state.ema.update(state.model)
    for average in state.horizons.values():
        average.update(state.model)
    state.step += 1
    synchronize(state.device)  # on a GPU: the step's time is its work, not the time to queue it
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
    release_free_memory(device)  # the allocator kept the run's peak (CPU: tune_cpu_allocator); the next run starts lean
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
            if progress and len(losses):  # read back from the device only when it is shown
                bar.set_postfix(loss=f"{float(losses.mean()):.3f}", refresh=False)
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
