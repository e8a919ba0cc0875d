"""Layers shared by the equivariant and plain models. None uses batch statistics.

DP-SGD needs every example's gradient to depend on that example alone; BatchNorm mixes the
examples of a batch (and escnn's batch norms, ``IIDBatchNorm2d`` included, do too), so every
normalisation here works within one example.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

#: Weight standardisation's epsilon, ŵ = (w − μ) / (σ + eps), wherever weights are standardised (the
#: official code's value; the per-example pull-back uses the same).
WS_EPS = 1e-5
#: Classifier heads: ``pool2x2`` (the paper's: average to 2×2, flatten; keeps coarse layout, so not
#: invariant) or ``global`` (average over all pixels: invariant when the features are).
HEADS = ("pool2x2", "global")


def check_head(head: str) -> str:
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    return head


def head_features(channels: int, head: str) -> int:
    """Inputs of the classifier after ``head`` pools a map of ``channels`` channels."""
    return channels * (4 if check_head(head) == "pool2x2" else 1)


def pool_for_head(x: torch.Tensor, head: str) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, head_features(C, head))``."""
    return F.adaptive_avg_pool2d(x, 2).flatten(1) if head == "pool2x2" else x.mean((2, 3))


def norm_groups(num_channels: int, num_groups: int) -> int:
    """GroupNorm's number of groups for ``num_channels`` channels (or fields), the official code's rule.

    ``num_groups`` itself when it divides ``num_channels``; otherwise the divisor of ``num_channels``
    closest to ``num_groups``, or the second closest if the closest leaves groups of at most 3
    channels, and 1 (layer norm) if that one does too. This is ``closest_divisor`` of the paper's
    code (``utils/utils.py`` in hlzl/equivariant), ties broken towards the smaller divisor as there.
    For the paper model (6, 13, 39 fields; 8 groups asked) it gives 1, 1 and 3 groups.

    >>> norm_groups(6, 8), norm_groups(13, 8), norm_groups(39, 8), norm_groups(64, 16), norm_groups(3, 8)
    (1, 1, 3, 16, 1)
    """
    if num_channels % num_groups == 0:
        return num_groups
    divisors = [d for d in range(1, num_channels + 1) if num_channels % d == 0]
    if len(divisors) < 2:
        return 1
    closest, second = sorted(divisors, key=lambda d: abs(d - num_groups))[:2]  # stable: smaller first on ties
    if num_channels // closest > 3:
        return closest
    return second if num_channels // second > 3 else 1


class FieldGroupNorm(nn.Module):
    """GroupNorm whose groups are made of whole feature fields (no affine parameters).

    For regular (permutation) fields the group action only permutes channels inside a field and
    moves pixels, so statistics pooled over whole fields and all pixels are invariant and the
    normalisation is equivariant. The number of groups follows the official code (:func:`norm_groups`).
    """

    def __init__(self, num_fields: int, field_size: int, num_groups: int = 8):
        super().__init__()
        self.num_fields = num_fields
        self.field_size = field_size
        self.groups = norm_groups(num_fields, num_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fields are contiguous blocks of channels, so F.group_norm's contiguous groups hold whole fields
        return F.group_norm(x, self.groups, eps=1e-5)

    def extra_repr(self) -> str:
        return f"fields={self.num_fields}, field_size={self.field_size}, groups={self.groups}"


def standardize(weight: torch.Tensor, dims=None, eps: float = WS_EPS) -> torch.Tensor:
    """Weight standardisation: zero mean, unit (biased) std over ``dims`` (all dims by default)."""
    dims = tuple(range(weight.ndim)) if dims is None else dims
    std, mean = torch.std_mean(weight, dim=dims, unbiased=False, keepdim=True)
    return (weight - mean) / (std + eps)


class WSConv2d(nn.Conv2d):
    """Conv2d with weight standardisation per output channel (Qiao et al. 2019; De et al. 2022)."""

    def expand_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The filter and bias the convolution uses (escnn's ``R2Conv`` has the same method): the
        per-sample gradient engine differentiates through it."""
        return standardize(self.weight, dims=(1, 2, 3)), self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.expand_parameters()
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
