"""One logical step of DP-SGD on given physical chunks: per-example gradients, clipping and summing
across the chunks, the noise once, the division by the expected batch size, the variants' hooks and
the SGD update (or, non-private, the plain mean gradient). Where the chunks come from is
:mod:`dpeq_utils.batches`; the run around the step is :mod:`dpeq_utils.train`.

Nothing here reads a value back from the device: the per-example losses stay device tensors until
the caller asks for them, so a step on a GPU queues its work without waiting for it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .per_sample import per_sample_grads
from .runtime import conv_layout, phase


def logical_step(model: nn.Module, optimizer, batches, num_chunks: int, private: bool, batch_size: int,
                 engine: str = "auto", variants=()) -> torch.Tensor:
    """One update from a logical batch given as ``num_chunks`` physical chunks of ``(views, labels)``.

    Private: per-example gradients of every chunk (by ``engine``, see :mod:`dpeq_utils.per_sample`)
    go to Opacus's ``DPOptimizer``, which clips and sums them; after the last chunk it adds the
    noise and divides by the expected batch size (``pre_step``). Non-private: the mean gradient over
    the ``batch_size`` examples. Then, for both, the variants' ``before_update`` and the SGD update.
    ``variants`` (:mod:`dpeq_utils.variants`) also restrict the per-example gradients before
    clipping. Returns every example's training loss (mean over its views), as one tensor on the
    model's device.
    """
    losses = []
    update_ready = not private and batch_size > 0
    for i, (views, labels) in enumerate(batches):
        if private:
            losses.append(_store_per_sample_gradients(model, views, labels, engine, variants))
            with phase("clip, sum, noise"):
                optimizer.signal_skip_step(do_skip=i < num_chunks - 1)
                update_ready = optimizer.pre_step()  # clip and sum; on the last chunk also noise and scaling
                if not update_ready:
                    optimizer.zero_grad(set_to_none=True)  # drops this chunk's per-example gradients, keeps the sum
        else:
            losses.append(_accumulate_plain_gradient(model, views, labels, batch_size))
    with phase("update"):
        if update_ready:
            for variant in variants:
                variant.before_update(model)
            getattr(optimizer, "original_optimizer", optimizer).step()
        optimizer.zero_grad(set_to_none=True)
    return torch.cat(losses) if losses else torch.zeros(0)


def _store_per_sample_gradients(model: nn.Module, views: torch.Tensor, labels: torch.Tensor,
                                engine: str = "auto", variants=()) -> torch.Tensor:
    """Put each example's gradient into ``p.grad_sample`` for Opacus's DPOptimizer to clip, restricted
    to the coordinates the variants keep this step (so the clipping norm counts only those); returns
    the chunk's per-example losses."""
    if len(views) == 0:  # an empty Poisson batch still gets its noise step
        for p in model.parameters():
            p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]  # Opacus's per-example slot
        return views.new_zeros(0)
    grads, example_losses = per_sample_grads(model, views, labels, engine)
    for name, p in model.named_parameters():
        grad = grads[name]
        for variant in variants:
            mask = variant.gradient_mask(name)
            if mask is not None:
                grad = grad * mask
        p.grad_sample = grad  # type: ignore[attr-defined]
    return example_losses.detach()


def _accumulate_plain_gradient(model: nn.Module, views: torch.Tensor, labels: torch.Tensor, batch_size: int) -> torch.Tensor:
    if len(views) == 0:
        return views.new_zeros(0)
    batch, k = views.shape[:2]
    with phase("forward"):
        logits = model(conv_layout(views.flatten(0, 1)))
        per_example = F.cross_entropy(logits, labels.repeat_interleave(k), reduction="none").view(batch, k).mean(1)
    with phase("backward"):
        (per_example.sum() / batch_size).backward()
    return per_example.detach()
