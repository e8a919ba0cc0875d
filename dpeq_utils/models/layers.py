"""Layers shared by the equivariant and plain models. None uses batch statistics.

DP-SGD needs every example's gradient to depend on that example alone; BatchNorm mixes the
examples of a batch (and escnn's batch norms, ``IIDBatchNorm2d`` included, do too), so every
normalisation here works within one example.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

#: Weight standardisation's epsilon, ŵ = (w − μ) / (σ + eps), wherever weights are standardised (the
#: official code's value; the per-example pull-back uses the same).
WS_EPS = 1e-5
#: Classifier heads: ``pool2x2`` (the paper's: average to 2×2, flatten; keeps coarse layout, so not
#: invariant) or ``global`` (average over all pixels: invariant when the features are).
HEADS = ("pool2x2", "global")


# ---------------------------------------------------------------------------------------------- Mish


#: The fused Mish runs on float32 CPU tensors with at least this many elements: the activation maps
#: of real batches, and the smoke profile's largest (4M elements); smaller maps keep ``F.mish``.
FUSED_MISH_MIN_NUMEL = 2 ** 20


def _mish_forward(x: torch.Tensor) -> torch.Tensor:
    # tanh(softplus(x)) = n / (n + 2) with n = e^x (e^x + 2): one exp instead of exp, log1p and tanh;
    # e^x is capped at e^20, where n / (n + 2) is 1 in float32 and float64 alike
    e = torch.exp(torch.clamp(x, max=20.0))
    n = e * (e + 2.0)
    return x * n / (n + 2.0)


def _mish_backward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    # d/dx x·tanh(sp(x)) = tanh(sp) + x·sech²(sp)·sigmoid(x) = n/(n+2) + 4x·e(1+e)/(n+2)²
    e = torch.exp(torch.clamp(x, max=20.0))
    n = e * (e + 2.0)
    d = n + 2.0
    return grad * (n / d + 4.0 * x * e * (1.0 + e) / (d * d))


class _FusedKernels:
    """``torch.compile``'d (inductor: one vectorised C++ loop each) forward and backward of Mish,
    compiled on first use; if compiling fails (no C++ compiler, an unsupported platform), a warning
    and ``F.mish`` from then on."""

    def __init__(self):
        self.forward = self.backward = None
        self.failed = os.environ.get("DPEQ_FUSED_MISH", "1") == "0"

    def usable(self, x: torch.Tensor) -> bool:
        return (not self.failed and x.device.type == "cpu" and x.dtype == torch.float32
                and x.numel() >= FUSED_MISH_MIN_NUMEL and not _in_functorch_transform(x))

    def run(self, name: str, *tensors: torch.Tensor) -> torch.Tensor | None:
        """The compiled kernel ``name`` on ``tensors`` (one shape), as flat vectors in one memory order:
        one compiled loop, with a symbolic length, serves every shape and layout without recompiling."""
        if self.failed:
            return None
        try:
            if getattr(self, name) is None:
                setattr(self, name, torch.compile({"forward": _mish_forward, "backward": _mish_backward}[name], dynamic=True))
            flats, unflatten = _as_flat(tensors)
            return unflatten(getattr(self, name)(*flats))
        except Exception as error:  # noqa: BLE001  (any compiler failure: fall back, say so once)
            self.failed = True
            warnings.warn(f"fused Mish unavailable ({type(error).__name__}: {str(error)[:200]}); using F.mish",
                          RuntimeWarning, stacklevel=3)
            return None


FUSED_MISH = _FusedKernels()


def _as_flat(tensors):
    """The tensors (one shape) as 1-d vectors in one memory order, and the function that gives such a
    vector the first tensor's shape and layout (channels-last stays channels-last; other layouts copied)."""
    first = tensors[0]
    channels_last = first.ndim == 4 and not first.is_contiguous() and first.is_contiguous(memory_format=torch.channels_last)
    if channels_last:
        n, c, h, w = first.shape
        flats = [t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1) for t in tensors]
        return flats, lambda flat: flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return [t.contiguous().view(-1) for t in tensors], lambda flat: flat.view(first.shape)


def _in_functorch_transform(x: torch.Tensor) -> bool:
    """Whether ``x`` is wrapped by a torch.func transform (the vmap engine): compiled kernels stay out."""
    return torch._C._functorch.is_functorch_wrapped_tensor(x)


class _FusedMish(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        out = FUSED_MISH.run("forward", x)
        return F.mish(x) if out is None else out

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        out = FUSED_MISH.run("backward", x, grad)
        return _mish_backward(x, grad) if out is None else out


def mish(x: torch.Tensor) -> torch.Tensor:
    """Mish, x·tanh(softplus(x)) (Misra 2019), the activation of every dpeq model.

    On a CPU, torch's own kernel evaluates exp, log1p and tanh forward and again backward, and
    is a sixth of the paper model's step; a large float32 map instead goes through two compiled
    kernels of the one-exp form (:func:`_mish_forward`, :func:`_mish_backward`). Same function, other
    rounding (forward and backward within 2e-6 of the largest value against float64, tested).
    Everything else (GPU, float64, small maps, inside torch.func transforms, ``DPEQ_FUSED_MISH=0``)
    uses ``F.mish``.
    """
    return _FusedMish.apply(x) if FUSED_MISH.usable(x) else F.mish(x)


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
