"""Layers shared by the equivariant and plain models. None uses batch statistics.

DP-SGD needs every example's gradient to depend on that example alone; BatchNorm mixes the
examples of a batch (and escnn's batch norms, ``IIDBatchNorm2d`` included, do too), so every
normalisation here works within one example.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is ``<= limit`` (GroupNorm needs whole, equal groups).

    >>> divisor_at_most(39, 8), divisor_at_most(6, 8), divisor_at_most(13, 8)
    (3, 6, 1)
    """
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


class FieldGroupNorm(nn.Module):
    """GroupNorm whose groups are made of whole feature fields (no affine parameters).

    For regular (permutation) fields the group action only permutes channels inside a field and
    moves pixels, so statistics pooled over whole fields and all pixels are invariant and the
    normalisation is equivariant. The number of groups is the largest divisor of the number of
    fields not above ``num_groups``.
    """

    def __init__(self, num_fields: int, field_size: int, num_groups: int = 8):
        super().__init__()
        self.num_fields = num_fields
        self.field_size = field_size
        self.groups = divisor_at_most(num_fields, num_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fields are contiguous blocks of channels, so F.group_norm's contiguous groups hold whole fields
        return F.group_norm(x, self.groups, eps=1e-5)

    def extra_repr(self) -> str:
        return f"fields={self.num_fields}, field_size={self.field_size}, groups={self.groups}"


def standardize(weight: torch.Tensor, dims=None, eps: float = 1e-5) -> torch.Tensor:
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
