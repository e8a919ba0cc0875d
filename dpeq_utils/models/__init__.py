"""Models by name. Every model maps ``(B, 3, H, W)`` float images to ``(B, num_classes)`` logits.

==================  ===========================================================================
name                what
==================  ===========================================================================
``eq_resnet9``      the paper's equivariant ResNet-9 (any group, optional restriction)
``resnet9``         plain ResNet-9 with the *same tensor widths* as that equivariant model
``resnet9_matched`` plain ResNet-9 with (about) the *same parameter count* as that model
``wrn16_4``         WRN-16-4 with GroupNorm and weight standardisation (De et al. 2022)
==================  ===========================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from ..equivariance import group_order
from .baselines import PlainResNet9, WideResNet
from .equivariant import PAPER_WIDTHS, EquivariantResNet9, fields_for_width, stage_fields


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters (for escnn convs: basis coefficients, not expanded filter entries)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def scale_widths(widths, scale: float) -> tuple[int, ...]:
    """Base widths times ``scale``, rounded, at least 1 each.

    >>> scale_widths((16, 32, 64), 0.5)
    (8, 16, 32)
    """
    return tuple(max(1, round(w * scale)) for w in widths)


def same_width_channels(group: str = "D4", restrict: bool = True, widths=PAPER_WIDTHS) -> tuple[int, int, int, int]:
    """Channel counts of a plain ResNet-9 whose activations have the equivariant model's shapes.

    >>> same_width_channels("D4", True, (16, 32, 64))
    (48, 104, 312, 156)
    """
    (n0, n1, n2), late = stage_fields(group, restrict, widths)
    order, late_order = group_order(group), group_order(late)
    return n0 * order, n1 * order, n2 * order, n2 * late_order


def matched_channels(target_params: int, reference: tuple[int, int, int, int], num_groups: int = 8,
                     head: str = "pool2x2", num_classes: int = 10) -> tuple[int, int, int, int]:
    """Scale ``reference`` channel counts (keeping their ratios) so a PlainResNet9 has about ``target_params``."""
    def params_at(scale: float) -> tuple[int, tuple[int, ...]]:
        channels = tuple(max(1, round(c * scale)) for c in reference)
        model = PlainResNet9(channels, num_groups=num_groups, head=head, num_classes=num_classes)
        return count_params(model), channels

    low, high = 1e-3, 4.0
    for _ in range(40):
        middle = (low * high) ** 0.5
        if params_at(middle)[0] < target_params:
            low = middle
        else:
            high = middle
    return min((params_at(s) for s in (low, high)), key=lambda pc: abs(pc[0] - target_params))[1]


@dataclass(frozen=True)
class ModelSpec:
    """A model of the registry: ``build(group, restrict, widths, num_groups, head, num_classes)``, and
    whether it takes a symmetry group (a model that does not ignores ``group`` and ``restrict``, and
    its records are named without a group)."""

    build: Callable[..., nn.Module]
    takes_group: bool


def _same_width(group, restrict, widths, num_groups, head, num_classes) -> nn.Module:
    return PlainResNet9(same_width_channels(group, restrict, widths), num_groups, head, num_classes)


def _matched(group, restrict, widths, num_groups, head, num_classes) -> nn.Module:
    target = count_params(EquivariantResNet9(group, restrict, widths, num_groups, head, num_classes))
    channels = matched_channels(target, same_width_channels(group, restrict, widths), num_groups, head, num_classes)
    return PlainResNet9(channels, num_groups, head, num_classes)


def _wrn16_4(group, restrict, widths, num_groups, head, num_classes) -> nn.Module:
    return WideResNet(depth=16, width=4, num_groups=16, num_classes=num_classes, base_widths=widths)


#: Models by name (the module docstring says what each is). Add one here; config validation, record
#: names, the command line and the notebooks read this.
MODEL_REGISTRY = {
    "eq_resnet9": ModelSpec(EquivariantResNet9, takes_group=True),
    "resnet9": ModelSpec(_same_width, takes_group=True),
    "resnet9_matched": ModelSpec(_matched, takes_group=True),
    "wrn16_4": ModelSpec(_wrn16_4, takes_group=False),
}
MODELS = tuple(MODEL_REGISTRY)


def takes_group(name: str) -> bool:
    return MODEL_REGISTRY[name].takes_group


def model_tag(name: str, group: str) -> str:
    """How records and messages name a model: with its group where it has one.

    >>> model_tag("eq_resnet9", "D4"), model_tag("wrn16_4", "D4")
    ('eq_resnet9-D4', 'wrn16_4')
    """
    return f"{name}-{group}" if takes_group(name) else name


def build_model(name: str, *, group: str = "D4", restrict: bool = True, widths=PAPER_WIDTHS, num_groups: int = 8,
                head: str = "pool2x2", num_classes: int = 10) -> nn.Module:
    """A model by name (see the module docstring). ``widths`` scale every model: ``wrn16_4`` has stage
    widths ``4 × widths`` (the published WRN-16-4 at the default 16/32/64) and ignores the other
    ResNet-9 arguments.

    >>> count_params(build_model("eq_resnet9", group="D4", restrict=True, widths=(4, 8, 16))) > 0
    True
    """
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    return MODEL_REGISTRY[name].build(group, restrict, tuple(widths), num_groups, head, num_classes)


__all__ = ["MODELS", "MODEL_REGISTRY", "ModelSpec", "model_tag", "takes_group", "build_model", "count_params",
           "scale_widths", "same_width_channels", "matched_channels", "EquivariantResNet9", "PlainResNet9", "WideResNet",
           "fields_for_width"]
