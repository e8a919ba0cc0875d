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

Run from the shell: ``python -m dpeq_utils.train --profile smoke --set target_epsilon=3``.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.optimizers import DPOptimizer

from .config import RunConfig
from .data import ImageDataset, Splits, apply_views, draw_views, load_splits, normalize
from .equivariance import evaluation_mode
from .models import build_model, count_params
from .per_sample import per_sample_grads, resolve_engine
from .preflight import check_memory
from .privacy import PrivacyBudget, PrivacyBudgetError
from .runtime import pick_device, release_free_memory, set_seed, tune_cpu_allocator
from .variants import CoordinateSelector, build_variants


def planned_steps(config: RunConfig, dataset_size: int) -> int:
    """Logical steps of a run: ``update_steps``, or ``epochs`` worth of expected batches."""
    if config.update_steps is not None:
        return config.update_steps
    return max(1, round(config.epochs * dataset_size / config.batch_size))


def sample_rate(config: RunConfig, dataset_size: int) -> float:
    if config.batch_size > dataset_size:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {dataset_size} training examples; "
                         "lower batch_size (it is the expected Poisson batch, q = batch_size / N)")
    return config.batch_size / dataset_size


def build_model_for(config: RunConfig) -> nn.Module:
    return build_model(config.model, group=config.group, restrict=config.restrict, widths=config.widths,
                       num_groups=config.num_groups, head=config.head)


def _streams(seed: int, count: int) -> list[int]:
    """Independent seeds for the sampler, the augmentations and the noise, derived from one seed."""
    return [int(s) >> 1 for s in np.random.SeedSequence(seed).generate_state(count, np.uint64)]


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
            logits = model(data.normalized(index, device))
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


def train(config: RunConfig, *, progress: bool = True, data: Splits | None = None, force_memory: bool = False) -> dict:
    """Train one run and return its results (the body of a run record, without provenance).

    ``data`` lets a caller pass already loaded :class:`~dpeq_utils.data.Splits` (or a (train, test)
    pair); otherwise they are loaded from ``config``.
    """
    return fit(config, progress=progress, data=data, force_memory=force_memory)[1]


def fit(config: RunConfig, *, progress: bool = True,
        data: Splits | None = None, force_memory: bool = False) -> tuple[nn.Module, dict]:
    """:func:`train`, also returning the trained model (its raw weights, not the EMA). On a CPU the
    run's memory is estimated before the first step and a run that would not fit is refused unless
    ``force_memory`` (:mod:`dpeq_utils.preflight`)."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    set_seed(config.seed)
    device = pick_device(config.device)
    if device.type == "cpu":
        tune_cpu_allocator()
    splits = Splits(*data) if data is not None else load_splits(
        config.dataset, train_size=config.train_size, test_size=config.test_size,
        validation_size=config.validation_size, seed=config.seed)
    train_data, test_data, validation_data = splits
    if config.validation_size and validation_data is None:
        raise ValueError("the data passed to train() has no validation split, but the config asks for one")
    n = len(train_data)
    q = sample_rate(config, n)
    steps = planned_steps(config, n)
    budget = None if config.non_private else PrivacyBudget(
        config.target_epsilon, config.target_delta, q, steps, config.accountant, dataset_size=n)

    model = build_model_for(config).to(device)
    model.train()
    if device.type == "cpu":
        check_memory(config, model, n + len(test_data) + (len(validation_data) if validation_data is not None else 0),
                     force=force_memory)
    base_optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    # a fourth stream for the variants; the first three are unchanged by asking for it (SeedSequence prefixes)
    sampler_seed, augment_seed, noise_seed, variant_seed = _streams(config.seed, 4)
    sampler = torch.Generator().manual_seed(sampler_seed)
    augmenter = torch.Generator().manual_seed(augment_seed)  # CPU: the same views on every device
    if budget is None:
        optimizer = base_optimizer
    else:
        optimizer = DPOptimizer(base_optimizer, noise_multiplier=budget.noise_multiplier, max_grad_norm=config.clip_norm,
                                expected_batch_size=config.batch_size, loss_reduction="mean",
                                generator=torch.Generator(device=device).manual_seed(noise_seed))
    variants = build_variants(config, model, torch.Generator(device=device).manual_seed(variant_seed))  # prunes now
    selector = next((v for v in variants if isinstance(v, CoordinateSelector)), None)
    if budget is not None and variants:
        optimizer.attach_step_hook(lambda _: [v.before_update(model) for v in variants])  # after noise, before update
    ema = WeightEMA(model, config.ema_decay)
    horizons = {decay: WeightEMA(model, decay) for decay in config.ema_horizons}  # scored only, never trained on
    engine = resolve_engine(config.per_sample_engine, model)
    images = train_data.images.to(device)
    labels = train_data.labels.to(device)

    history, batch_sizes, recent_losses = [], [], []  # recent_losses: per-example training losses since the last evaluation

    def record_evaluation(step: int) -> dict:
        eval_started = time.perf_counter()
        accuracy, loss = evaluate(model, test_data, device)
        with swapped_parameters(model, ema.values):
            accuracy_ema, loss_ema = evaluate(model, test_data, device)
        other_horizons = {}
        for decay, average in horizons.items():
            with swapped_parameters(model, average.values):
                other_horizons[f"{decay:g}"] = evaluate(model, test_data, device)[0]
        entry = {"step": step, "epsilon": budget.epsilon() if budget else None,
                 "train_loss": math.fsum(recent_losses) / len(recent_losses) if recent_losses else None,
                 "test_accuracy": accuracy, "test_loss": loss, "test_accuracy_ema": accuracy_ema,
                 "test_loss_ema": loss_ema, **({"test_accuracy_ema_horizons": other_horizons} if horizons else {}),
                 "elapsed_s": time.perf_counter() - started,
                 "eval_time_s": time.perf_counter() - eval_started}
        history.append(entry)
        recent_losses.clear()
        return entry

    if config.eval_every:  # the learning curve starts where training starts
        record_evaluation(0)
    loop_started = time.perf_counter()
    bar = tqdm(range(1, steps + 1), desc=f"{config.model} {'non-private' if budget is None else 'DP-SGD'}",
               disable=not progress, leave=False)
    for step in bar:
        if budget is not None:
            budget.spend()
        if selector is not None:
            selector.select(model)  # reads the current (released) iterate only, never the batch
        chosen = torch.nonzero(torch.rand(n, generator=sampler) < q).squeeze(1).to(device)
        batch_sizes.append(len(chosen))
        draws = draw_views(len(chosen), config.aug_mult, augmenter)  # once per logical batch, whatever the chunks
        starts = range(0, len(chosen), config.physical_batch_size) if len(chosen) else [0]
        batches = ((apply_views(normalize(images[chosen[i:i + config.physical_batch_size]], train_data.mean,
                                          train_data.std), draws[i:i + config.physical_batch_size]),
                    labels[chosen[i:i + config.physical_batch_size]]) for i in starts)
        step_losses = logical_step(model, optimizer, batches, len(starts), private=budget is not None,
                                   batch_size=len(chosen), engine=engine, variants=variants)
        recent_losses.extend(step_losses)
        ema.update(model)
        for average in horizons.values():
            average.update(model)
        if step_losses:
            bar.set_postfix(loss=f"{math.fsum(step_losses) / len(step_losses):.3f}", refresh=False)
        if config.eval_every and step % config.eval_every == 0 and step != steps:
            record_evaluation(step)
    bar.close()
    train_time = time.perf_counter() - loop_started - sum(h["eval_time_s"] for h in history)
    final = record_evaluation(steps)
    validation = {}
    if validation_data is not None:  # the split learning rates are chosen on; the test set is never used for that
        validation["val_accuracy"], validation["val_loss"] = evaluate(model, validation_data, device)
        with swapped_parameters(model, ema.values):
            validation["val_accuracy_ema"], validation["val_loss_ema"] = evaluate(model, validation_data, device)

    if device.type == "cpu":
        release_free_memory()  # the allocator kept the run's peak (tune_cpu_allocator); the next run starts lean
    epsilon = None
    if budget is not None:
        epsilon = budget.epsilon()
        if budget.steps_taken != steps or epsilon > config.target_epsilon:
            raise PrivacyBudgetError(f"internal error: took {budget.steps_taken} of {steps} steps, ε={epsilon} "
                                     f"(target {config.target_epsilon}); the run is discarded")
    return model, {
        "noise_multiplier": budget.noise_multiplier if budget else 0.0,
        "sample_rate": q,
        "steps": steps,
        "epsilon_spent": epsilon,
        "dataset_size": n,
        "data": {"origin": train_data.meta.get("origin"), "verified": train_data.meta.get("verified"),
                 "train_sha256": train_data.digest(), "test_sha256": test_data.digest()},
        "test_size": len(test_data),
        "mean_batch_size": float(np.mean(batch_sizes)),
        "test_accuracy": final["test_accuracy"],
        "test_accuracy_ema": final["test_accuracy_ema"],
        "test_loss": final["test_loss"],
        **({"test_accuracy_ema_horizons": final["test_accuracy_ema_horizons"]} if horizons else {}),
        **validation,
        "num_params": count_params(model),
        "kept_params": round(count_params(model) * selector.kept_fraction) if selector else count_params(model),
        "mean_updated_fraction": float(np.mean(selector.updated_fractions)) if selector else 1.0,
        "epochs": steps * q,
        "per_sample_engine": engine if budget else None,  # the engine that ran ("auto" resolved)
        "train_time_s": train_time,  # the step loop alone: sampling, gradients, updates (no evaluation)
        "wall_time_s": time.perf_counter() - started,
        "history": history,
    }


def logical_step(model: nn.Module, optimizer, batches, num_chunks: int, private: bool, batch_size: int,
                 engine: str = "auto", variants=()) -> list[float]:
    """One update from a logical batch given as ``num_chunks`` physical chunks of ``(views, labels)``.

    Private: per-example gradients of every chunk go to Opacus's ``DPOptimizer``, which clips and
    sums them, skipping the update until the last chunk, where it adds the noise, divides by the
    expected batch size and steps (per-example gradients by ``engine``, see :mod:`dpeq_utils.per_sample`).
    Non-private: the mean gradient over the ``batch_size`` examples.
    ``variants`` (:mod:`dpeq_utils.variants`) restrict the per-example gradients before clipping; their
    ``before_update`` must already be attached to a private ``optimizer`` (it runs after the noise)
    and is called here for the non-private one. Returns every example's training loss (mean over its views).
    """
    losses = []
    for i, (views, labels) in enumerate(batches):
        if private:
            losses += _store_per_sample_gradients(model, views, labels, engine, variants)
            optimizer.signal_skip_step(do_skip=i < num_chunks - 1)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            losses += _accumulate_plain_gradient(model, views, labels, batch_size)
    if not private:
        if batch_size:
            for variant in variants:
                variant.before_update(model)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def _store_per_sample_gradients(model: nn.Module, views: torch.Tensor, labels: torch.Tensor,
                                engine: str = "auto", variants=()) -> list[float]:
    """Put each example's gradient into ``p.grad_sample`` for Opacus's DPOptimizer to clip, restricted
    to the coordinates the variants keep this step (so the clipping norm counts only those)."""
    if len(views) == 0:  # an empty Poisson batch still gets its noise step
        for p in model.parameters():
            p.grad_sample = p.new_zeros((0, *p.shape))
        return []
    grads, example_losses = per_sample_grads(model, views, labels, engine)
    for name, p in model.named_parameters():
        p.grad_sample = grads[name]
        for variant in variants:
            mask = variant.gradient_mask(name)
            if mask is not None:
                p.grad_sample = p.grad_sample * mask
    return example_losses.detach().tolist()


def _accumulate_plain_gradient(model: nn.Module, views: torch.Tensor, labels: torch.Tensor, batch_size: int) -> list[float]:
    if len(views) == 0:
        return []
    batch, k = views.shape[:2]
    logits = model(views.flatten(0, 1))
    per_example = F.cross_entropy(logits, labels.repeat_interleave(k), reduction="none").view(batch, k).mean(1)
    (per_example.sum() / batch_size).backward()
    return per_example.detach().tolist()


# ----------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    """``python -m dpeq_utils.train`` (see :func:`dpeq_utils.cli.train_main`)."""
    from .cli import train_main

    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
