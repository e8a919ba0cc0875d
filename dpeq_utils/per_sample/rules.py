"""The hooks engine's per-layer rules (as Opacus's ``register_grad_sampler``): a layer's input and
output gradient → per-example gradients of its effective weight and bias.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from escnn import nn as enn
from torch.nn.modules.utils import _pair

#: The hooks engine's per-example gradient rules, by layer type (as Opacus's ``register_grad_sampler``):
#: ``rule(module, layer_input, grad_output, batch) -> per-example gradients of the layer's effective
#: weight and bias``. A subclass uses its nearest registered base's rule.
GRAD_RULES: dict[type, Callable] = {}


def register_grad_rule(*layer_types: type):
    def register(rule):
        for layer_type in layer_types:
            GRAD_RULES[layer_type] = rule
        return rule
    return register


#: Output maps with at least this many pixels get their per-example filter gradients from one grouped
#: convolution backward (oneDNN on a CPU), smaller ones from unfold + batched matmul. Measured on the
#: paper model at batch 256 (2-core AMD EPYC, AVX-512; ``benchmarks/per_sample_speed.py --phases``): the
#: grouped backward is 1.1-1.7x faster on its 32x32 and 16x16 maps, and 83x *slower* on its
#: 8x8 map with 312 input channels (17.5 s against 0.21 s: a slow oneDNN kernel for 256 groups on a
#: small map). At >= 256 pixels it won on every shape tried (3 to 312 channels). Both are exact. A CPU
#: threshold: on other devices :func:`filter_grads_method` takes unfold on every map.
GROUPED_MIN_PIXELS = 256


@register_grad_rule(nn.Conv2d, enn.R2Conv)
def conv_rule(module, x: torch.Tensor, grad_out: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """Per-example gradients of a 2-d convolution (plain, weight-standardised or steerable).

    The ``K`` views of an example are summed (each row's gradient already carries the 1/K of the
    mean). Two exact methods, chosen by the output map's size (:data:`GROUPED_MIN_PIXELS`):

    * grouped: the examples become the groups of one convolution over a batch of views, ``(K, B·I, H,
      W)``; its weight gradient, ``(B·O, I, k, k)``, is every example's filter gradient, and the sum over
      the views is the convolution's own sum over its batch;
    * unfold: the input's k×k patches ``(B, K, I·k², L)`` times the output gradient ``(B, K, O, L)``,
      summed over views and pixels (Opacus's rule for ``nn.Conv2d``).
    """
    if getattr(module, "groups", 1) != 1 or getattr(module, "padding_mode", "zeros") != "zeros":
        raise NotImplementedError(f"hooks engine: grouped or non-zero-padded convolution {module}")
    grad_rows = grad_out.reshape(batch, grad_out.shape[0] // batch, grad_out.shape[1], -1)
    method = filter_grads_method(grad_rows.shape[-1], x.device.type)
    return {"weight": method(module, x, grad_out, batch), "bias": grad_rows.sum((1, 3))}


def filter_grads_method(pixels: int, device_type: str = "cpu") -> Callable:
    """The engine's method for per-example filter gradients on an output map of ``pixels`` pixels, on a
    device of ``device_type``. On a CPU by :data:`GROUPED_MIN_PIXELS` (measured with oneDNN). Elsewhere
    unfold on every map: its product is one batched matrix multiplication (cuBLAS on a GPU: fast,
    deterministic, no algorithm search), while a grouped convolution's weight gradient with one group
    per example is a kernel GPUs are rarely tuned for. A choice made without a GPU to measure on:
    ``benchmarks/gpu_check.py`` times the step by phase, and
    :func:`~dpeq_utils.benchmark.measure.layer_breakdown` times both methods per layer, on the GPU at hand."""
    if device_type != "cpu":
        return unfold_filter_grads
    return grouped_filter_grads if pixels >= GROUPED_MIN_PIXELS else unfold_filter_grads


def kernel_size(module) -> tuple[int, ...]:
    return tuple(module.weight.shape[2:]) if isinstance(module, nn.Conv2d) else (module.kernel_size,) * 2


def grouped_filter_grads(module, x: torch.Tensor, grad_out: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-example filter gradients ``(B, O, I, k, k)`` of a convolution by one grouped convolution
    backward (see :func:`conv_rule`); ``x`` and ``grad_out`` hold ``batch`` examples' views as rows."""
    kernel = kernel_size(module)
    rows, out_channels = grad_out.shape[:2]
    in_channels, views = x.shape[1], rows // batch
    by_view = x.reshape(batch, views, *x.shape[1:]).transpose(0, 1).reshape(views, batch * in_channels, *x.shape[2:])
    grad_by_view = (grad_out.reshape(batch, views, *grad_out.shape[1:]).transpose(0, 1)
                    .reshape(views, batch * out_channels, *grad_out.shape[2:]))
    shape_only = x.new_empty(()).expand(batch * out_channels, in_channels, *kernel)  # read for its shape
    weight = torch.ops.aten.convolution_backward(
        grad_by_view, by_view, shape_only, None, _pair(module.stride), _pair(module.padding),
        _pair(module.dilation), False, [0, 0], batch, [False, True, False])[1]
    return weight.view(batch, out_channels, in_channels, *kernel)


def unfold_filter_grads(module, x: torch.Tensor, grad_out: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-example filter gradients ``(B, O, I, k, k)`` of a convolution by unfold + batched product
    (see :func:`conv_rule`)."""
    kernel = kernel_size(module)
    rows, out_channels = grad_out.shape[:2]
    grad_rows = grad_out.reshape(batch, rows // batch, out_channels, -1)
    columns = F.unfold(x, kernel, dilation=module.dilation, padding=module.padding, stride=module.stride)
    columns = columns.view(batch, rows // batch, columns.shape[1], -1)
    return torch.einsum("bkol,bkil->boi", grad_rows, columns).reshape(batch, out_channels, x.shape[1], *kernel)


@register_grad_rule(nn.Linear)
def _linear_rule(module, x: torch.Tensor, grad_out: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    x = x.reshape(batch, -1, x.shape[-1])
    grad_rows = grad_out.reshape(batch, -1, grad_out.shape[-1])
    return {"weight": torch.einsum("bko,bki->boi", grad_rows, x), "bias": grad_rows.sum(1)}


@register_grad_rule(nn.GroupNorm)
def _group_norm_rule(module, x: torch.Tensor, grad_out: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    normalized = F.group_norm(x, module.num_groups, eps=module.eps)
    grad_rows = grad_out.reshape(batch, -1, *grad_out.shape[1:])
    normalized = normalized.reshape(grad_rows.shape)
    reduce = (1, *range(3, grad_rows.ndim))  # views and pixels
    return {"weight": (grad_rows * normalized).sum(reduce), "bias": grad_rows.sum(reduce)}


def rule_for(module: nn.Module):
    return next((GRAD_RULES[t] for t in type(module).__mro__ if t in GRAD_RULES), None)
