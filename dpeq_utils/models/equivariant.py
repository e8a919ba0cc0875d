"""The paper's equivariant ResNet-9 (Hölzl et al. 2023), for any group in C1…C16, D1…D8.

Topology (ResNet-9 of Klause et al. with "ScaleNorm"), each block = steerable 3×3 conv → Mish →
field-wise GroupNorm (no affine) [→ 2×2 max pool]::

    conv1 (w0) → conv2 (w1, pool) → res1: 2 blocks (w1), + skip → norm
    → conv3 (w2, pool) → [restrict G → H] → conv4 (w2, pool) → res2: 2 blocks (w2), + skip → norm
    → group pooling → head

Feature fields are regular representations of G (of H after the restriction), so pointwise
Mish, max pooling and field-wise GroupNorm are all equivariant. Basis coefficients of every
steerable conv are weight-standardised before the basis expansion, as in the official code.

**Width rule.** A stage of base width ``w`` gets ``int(w * sqrt(1.5 |G|) / |G|)`` regular fields.
A regular→regular steerable conv has about ``n_in n_out |G| k²`` free parameters, so this keeps
the parameter count near ``1.5 w² k²`` for every group: groups differ in how the budget is spent
(more channels per parameter for larger |G|), not in the budget itself.

**Heads.** ``head="pool2x2"`` (the paper's) averages the group-pooled map down to 2×2 and flattens
it into a linear layer: it keeps coarse spatial layout, so the logits are *not* invariant to
rotations (only the features are equivariant). ``head="global"`` averages over all pixels and
gives exactly invariant logits for 90° rotations and flips of the last stage's group.

Warning:
    escnn's ``R2Conv`` caches its expanded filter when the module switches to eval mode and drops it
    in train mode. After changing parameters in eval mode, call ``model.train()`` then ``model.eval()``
    to rebuild the filters.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from escnn import nn as enn

from ..equivariance import group_order, group_pool, halved_subgroup, make_gspace
from .layers import WS_EPS, FieldGroupNorm, check_head, head_features, mish, pool_for_head

PAPER_WIDTHS = (16, 32, 64)


def fields_for_width(width: int, group: str) -> int:
    """Number of regular fields for base width ``width`` under ``group`` (the width rule above).

    >>> [fields_for_width(w, "D4") for w in (16, 32)], fields_for_width(64, "D2")
    ([6, 13], 39)
    """
    order = group_order(group)
    return max(1, int(width * math.sqrt(1.5 * order) / order))


def stage_fields(group: str, restrict: bool, widths) -> tuple[tuple[int, int, int], str]:
    """Regular fields of the three stages, and the group of the last one (the halved subgroup when
    restricted): the width rule applied as the official code does (conv3 already gets the late count).

    >>> stage_fields("D4", True, (16, 32, 64))
    ((6, 13, 39), 'D2')
    """
    late_group = halved_subgroup(group)[0] if restrict else group
    return (fields_for_width(widths[0], group), fields_for_width(widths[1], group),
            fields_for_width(widths[2], late_group)), late_group


class StandardizedR2Conv(enn.R2Conv):
    """escnn ``R2Conv`` whose basis coefficients are standardised (zero mean, unit std) before expansion."""

    def expand_parameters(self):
        std, mean = torch.std_mean(self.weights, unbiased=False)
        weights = (self.weights - mean) / (std + WS_EPS)
        filter_ = self.basisexpansion(weights)
        filter_ = filter_.reshape(filter_.shape[0], filter_.shape[1], *(self.kernel_size,) * self.d)
        bias = None if self.bias is None else self.bias_expansion @ self.bias
        return filter_, bias


def steerable_conv(in_type: enn.FieldType, out_type: enn.FieldType, kernel_size: int = 3, bias: bool = True) -> StandardizedR2Conv:
    """dpeq's steerable convolution: band-limited basis (frequencies up to 3r), weight-standardised
    coefficients, "same" padding.

    ``recompute=True``: escnn otherwise shares one basis module between every layer and model with
    the same representations, so ``.double()`` or ``.to(device)`` on one model silently changes others.
    """
    return StandardizedR2Conv(in_type, out_type, kernel_size=kernel_size, padding=kernel_size // 2, bias=bias,
                              sigma=None, frequencies_cutoff=lambda r: 3 * r, initialize=False, recompute=True)


def regular_type(gspace, num_fields: int) -> enn.FieldType:
    return enn.FieldType(gspace, num_fields * [gspace.regular_repr])


class EquivariantBlock(nn.Module):
    """Steerable conv 3×3 → Mish → field GroupNorm → optional 2×2 max pool, on plain tensors."""

    def __init__(self, in_type: enn.FieldType, num_fields: int, num_groups: int, pool: bool):
        super().__init__()
        self.in_type = in_type
        self.out_type = regular_type(in_type.gspace, num_fields)
        self.conv = steerable_conv(in_type, self.out_type)
        # escnn's generalised He initialisation, as the official code. The scale matters even though
        # the coefficients are standardised: a scale-invariant weight's effective learning rate is
        # lr / ||w||^2, and N(0, 1) coefficients (||w|| = sqrt(#coefficients), up to 300 here) made
        # SGD ~100-1000x slower (measured: D4 stuck at chance on the synthetic data after 150 steps).
        # cache=False: escnn's cache is keyed by the basis module, whose hash is its basis tensor's
        # identity, and every dpeq layer samples its own basis (recompute=True), so the cache never
        # hit and kept every layer ever built alive (8 entries more per paper model; six paper models
        # built and dropped in one process: 396 → 437 MB resident). Same variances, same random draws.
        enn.init.generalized_he_init(self.conv.weights.data, self.conv.basisexpansion, cache=False)
        field_size = in_type.gspace.fibergroup.order()
        self.norm = FieldGroupNorm(num_fields, field_size, num_groups)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(enn.GeometricTensor(x, self.in_type)).tensor
        x = self.norm(mish(x))
        return F.max_pool2d(x, 2) if self.pool else x


def restrict_field_type(field_type: enn.FieldType, subgroup_id) -> enn.FieldType:
    """Restrict a field type to a subgroup, remembering the element map for equivariance checks."""
    restricted = field_type.restrict(subgroup_id)
    _, _, restriction = field_type.gspace.restrict(subgroup_id)
    restricted.gspace._dpeq_restriction = restriction
    return restricted


class EquivariantResNet9(nn.Module):
    """See the module docstring. ``widths`` are the three base widths before the width rule."""

    def __init__(self, group: str = "D4", restrict: bool = True, widths=PAPER_WIDTHS, num_groups: int = 8,
                 head: str = "pool2x2", num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"widths must be three positive integers, got {widths}")
        check_head(head)
        if restrict and group == "C1":
            raise ValueError("C1 is the trivial group and has no subgroup to restrict to; use restrict=False")
        self.group, self.restrict, self.widths, self.head_kind = group, restrict, widths, head
        gspace = make_gspace(group)
        self.input_type = enn.FieldType(gspace, in_channels * [gspace.trivial_repr])

        (n0, n1, n2), late_group = stage_fields(group, restrict, widths)
        self.num_fields = (n0, n1, n2)

        self.conv1 = EquivariantBlock(self.input_type, n0, num_groups, pool=False)
        self.conv2 = EquivariantBlock(self.conv1.out_type, n1, num_groups, pool=True)
        self.res1 = nn.Sequential(EquivariantBlock(self.conv2.out_type, n1, num_groups, pool=False),
                                  EquivariantBlock(self.conv2.out_type, n1, num_groups, pool=False))
        self.norm1 = FieldGroupNorm(n1, gspace.fibergroup.order(), num_groups)
        self.conv3 = EquivariantBlock(self.conv2.out_type, n2, num_groups, pool=True)
        self.restricted_type = (restrict_field_type(self.conv3.out_type, halved_subgroup(group)[1])
                                if restrict else self.conv3.out_type)
        self.conv4 = EquivariantBlock(self.restricted_type, n2, num_groups, pool=True)
        self.res2 = nn.Sequential(EquivariantBlock(self.conv4.out_type, n2, num_groups, pool=False),
                                  EquivariantBlock(self.conv4.out_type, n2, num_groups, pool=False))
        late_order = self.conv4.out_type.gspace.fibergroup.order()
        self.norm2 = FieldGroupNorm(n2, late_order, num_groups)
        self.late_field_size = late_order
        self.classifier = nn.Linear(head_features(n2, head), num_classes)

    def _trunk(self, x: torch.Tensor, keep: dict | None = None) -> torch.Tensor:
        x = self.conv1(x)
        x = self.conv2(x)
        x = self.norm1(self.res1(x) + x)
        if keep is not None:
            keep["stage1"] = enn.GeometricTensor(x, self.conv2.out_type)
        x = self.conv3(x)
        if keep is not None:
            keep["stage2"] = enn.GeometricTensor(x, self.conv3.out_type)
        x = self.conv4(x)
        x = self.norm2(self.res2(x) + x)
        if keep is not None:
            keep["stage3"] = enn.GeometricTensor(x, self.conv4.out_type)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(pool_for_head(group_pool(self._trunk(x), self.late_field_size), self.head_kind))

    def feature_maps(self, x: torch.Tensor) -> "OrderedDict[str, enn.GeometricTensor]":
        """Feature maps after each stage, typed (stage3 lives on the subgroup when restricted)."""
        keep: OrderedDict = OrderedDict()
        self._trunk(x, keep)
        return keep


def kernel_parameters(group: str, kernel_size: int = 3) -> dict:
    """Free parameters of one 3×3 conv between two regular fields: steerable versus unconstrained.

    An unconstrained kernel between two |G|-channel fields has |G|²k² entries; the steerable
    constraint ``k(g·x) = ρ(g) k(x) ρ(g)⁻¹`` leaves about |G| times fewer (dpeq's conv settings).

    >>> kernel_parameters("D4")["plain"]
    576
    """
    gspace = make_gspace(group)
    field = regular_type(gspace, 1)
    conv = steerable_conv(field, field, kernel_size=kernel_size, bias=False)
    order = gspace.fibergroup.order()
    steerable = conv.weights.numel()
    plain = order * order * kernel_size ** 2
    return {"group": group, "order": order, "steerable": steerable, "plain": plain, "ratio": plain / steerable}
