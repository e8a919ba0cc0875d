"""One logical batch, from the sampler to the device: Poisson sampling (the q and step count the
accountant is given), the augmentation views drawn for it, and its physical chunks where the step
computes.

The sampler and the augmentation draw from CPU generators, so a run draws the same batches and views
on every device. On a GPU the training set is placed on the device once (uint8 images and labels:
150 MB for all of CIFAR-10; :meth:`dpeq_utils.data.ImageDataset.on`), so a step copies to it only the
batch's indices and view draws, without blocking the host (:func:`dpeq_utils.runtime.to_device_async`);
the chunks are then indexed, normalised and augmented on the device. On a CPU the same code indexes
the host copy and computes exactly what it always did.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .config import MAX_STEPS, RunConfig
from .data import ImageDataset, apply_views, draw_views
from .runtime import to_device_async


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


def physical_chunks(data: ImageDataset, chosen: torch.Tensor, aug_mult: int, chunk: int, augment: torch.Generator,
                    device: torch.device) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], int]:
    """The logical batch ``chosen`` (host indices) as physical chunks of ``chunk`` examples: an
    iterator of ``(views (B, K, C, H, W), labels (B,))`` on ``device``, and how many chunks it yields
    (at least one: an empty Poisson batch still takes its noise step). The views are drawn once for the
    whole logical batch, so how it is cut into chunks changes no random draw."""
    draws = draw_views(len(chosen), aug_mult, augment)
    index, draws = to_device_async(chosen, device), draws.to(device)
    placed = data.on(device)
    starts = range(0, len(chosen), chunk) if len(chosen) else [0]
    return ((apply_views(placed.normalized(index[i:i + chunk]), draws[i:i + chunk]), placed.labels[index[i:i + chunk]])
            for i in starts), len(starts)
