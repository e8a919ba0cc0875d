"""Whole-model per-example gradients: ``torch.func`` (``vmap`` of ``grad``), which works for any
model, and the naive loop over examples every engine is tested against.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from .. import equivariance  # noqa: F401  (applies the escnn fixes torch.func needs)


def example_loss(model: nn.Module, params: dict, buffers: dict, views: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of one example's ``K`` views ``(K, C, H, W)`` under ``params``."""
    logits = functional_call(model, (params, buffers), (views,))
    return F.cross_entropy(logits, label.expand(views.shape[0]))


def vmap_per_sample_grads(model: nn.Module, views: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradients of each example's loss: ``{name: (B, *param.shape)}``, and the losses ``(B,)``.

    ``views`` is ``(B, K, C, H, W)`` (``K`` augmentation views per example), ``labels`` is ``(B,)``.
    The model must be in train mode (escnn expands its filters from the current coefficients only then).
    """
    if views.ndim != 5:
        raise ValueError(f"views must be (B, K, C, H, W), got shape {tuple(views.shape)}")
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def loss(params_, views_, label_):
        return example_loss(model, params_, buffers, views_, label_)

    grads, losses = vmap(grad_and_value(loss), in_dims=(None, 0, 0))(params, views, labels)
    return grads, losses


def naive_per_sample_grads(model: nn.Module, views: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference: one ordinary backward pass per example (slow; for tests)."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    per_example = []
    for views_i, label_i in zip(views, labels):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(views_i), label_i.expand(views_i.shape[0])).backward()
        per_example.append({n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()  # unused: zero
                            for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad(set_to_none=True)
    return {n: torch.stack([g[n] for g in per_example]) for n in names}


# ---------------------------------------------------------------------------------------------- hooks engine
