"""Pull-backs: from per-example gradients of a layer's effective filter and bias to its parameters
(basis coefficients, standardised weights), in closed form for dpeq's own layers and by ``vjp``
otherwise.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vjp, vmap

from ..escnn_compat import single_block_basis
from ..models.equivariant import StandardizedR2Conv
from ..models.layers import WS_EPS, WSConv2d


def expansion_function(module: nn.Module) -> tuple[Callable, dict[str, torch.Tensor]]:
    """``(function, params)`` with ``function(params) -> {"weight": filter[, "bias": bias]}`` as the layer
    builds them in ``expand_parameters`` (for the generic pull-back)."""
    params = {name: p.detach() for name, p in module.named_parameters(recurse=False) if p.requires_grad}
    holder = _ExpandParameters(module)

    def function(values):
        weight, bias = functional_call(holder, {f"layer.{n}": v for n, v in values.items()}, ())
        return {"weight": weight} if bias is None else {"weight": weight, "bias": bias}

    return function, params


class _ExpandParameters(nn.Module):
    """Calls ``layer.expand_parameters()`` so that ``functional_call`` can swap the layer's parameters."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self):
        return self.layer.expand_parameters()


def pull_back_to_parameters(module, per_example_outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Chain rule from per-example gradients of a layer's effective weight/bias to its parameters.

    The generic path vmaps the pull-back of ``expand_parameters``; :func:`closed_form_pull_back` does the
    same arithmetic in closed form for dpeq's own layers (about 2× faster on CPU; tested equal).
    """
    fast = closed_form_pull_back(module, per_example_outputs)
    if fast is not None:
        return fast
    function, params = expansion_function(module)
    outputs, pullback = vjp(function, params)  # type: ignore[misc]  # (torch.func's overloads confuse mypy)
    cotangents = {key: per_example_outputs[key] for key in outputs}
    (grads,) = vmap(pullback)(cotangents)
    return grads


def standardize_pull_back(weight: torch.Tensor, grad: torch.Tensor, leading_dims: int = 0, eps: float = WS_EPS,
                          inplace: bool = False) -> torch.Tensor:
    """Per-example gradients through :func:`~dpeq_utils.models.layers.standardize`.

    ``weight`` is the raw weight, standardised over all dims after its first ``leading_dims``
    (0: the whole tensor, as escnn coefficients; 1: per output channel, as ``WSConv2d``); ``grad`` is
    ``(B, *weight.shape)``: per-example gradients of the standardised weight ŵ = (w − μ) / (s + eps),
    with s the biased std. Returns, per example and per standardised group (means over the group),

        (g − mean g − ŵ · mean(g ŵ) · (s + eps) / s) / (s + eps).

    ``inplace=True`` overwrites ``grad``; no temporaries of its size are made (these tensors are
    B × #parameters, gigabytes for WRN-16-4 at B = 256). The five passes over it run on slices of
    examples of about :data:`CACHE_SLICE_BYTES`, so that the later passes read from the CPU's cache
    instead of memory (same formulas; the sums may round differently than in one piece). On other
    devices the passes run on all examples at once.
    """
    groups = weight.shape[:leading_dims]
    flat = weight.reshape(*groups, -1)
    std, mean = torch.std_mean(flat, dim=-1, unbiased=False, keepdim=True)
    normalized = (flat - mean) / (std + eps)  # (*groups, R)
    batch = grad.shape[0]
    out = grad.reshape(batch, *groups, -1)
    if not inplace:
        out = out.clone()
    size = out.shape[-1]
    scale = (std + eps) / (std * size)
    if out.device.type == "cpu":
        rows = max(1, CACHE_SLICE_BYTES // max(1, out[0].numel() * out.element_size()))
    else:  # a GPU's caches are not what this slicing is for: one piece, one kernel per pass
        rows = max(1, batch)
    for start in range(0, batch, rows):
        part = out[start:start + rows]
        projection = torch.einsum("b...r,...r->b...", part, normalized).unsqueeze(-1)  # Σ g ŵ per group
        projection *= scale
        grad_mean = part.mean(-1, keepdim=True)
        part.addcmul_(normalized.expand_as(part), projection, value=-1).sub_(grad_mean).div_(std + eps)
    return out.view(grad.shape)


#: Size of the slices of examples that memory-bound passes over per-example gradients work on: small
#: enough to stay in a CPU's last-level cache between passes (a few MB on any current CPU).
CACHE_SLICE_BYTES = 4 * 2 ** 20


def basis_contraction(filter_grads: torch.Tensor, basis: torch.Tensor, out_fields: int) -> torch.Tensor:
    """``Σ_{o, r} filter_grads[b, x, o, y, r] · basis[n, o, r]`` as ``(B, x, y, n)``, for filter gradients
    ``(B, x·o, y·r)`` in row-major order (``r`` = one input field's channels × k × k).

    On a CPU in float32 this runs as one oneDNN convolution, without copying the filter gradients:
    their memory *is* a batch of ``B·x`` channels-last images with ``r`` channels, ``o`` rows and ``y``
    columns, and a kernel of ``o`` rows and one column sums each field pair's ``o`` rows against every
    basis element; the output's memory is ``(B, x, y, n)``. Why oneDNN and not ``torch.matmul``: torch's
    CPU build multiplies matrices with MKL, whose single-precision product runs its AVX2 code on AMD
    processors, while oneDNN compiles kernels for the ISA at hand (AVX-512 there). Measured on a 2-core
    AMD EPYC (family 26, AVX-512), float32: ``(129792, 576) @ (576, 64)`` (the paper model's 16×16 basis
    product) at 47 G multiply-adds/s through MKL and 204 as oneDNN's 1×1 convolution; the paper model's
    basis pull-back at batch 256 went from 0.50 to 0.21 s (with a transposing copy into rows of one
    field pair). Without the copy, as one image of ``B·x·o`` rows and a kernel taken with stride ``o``,
    0.36 → 0.31 s on a family-25 model-17 EPYC; as a batch of images, which oneDNN convolves with a
    faster kernel, the paper model's 8×8 layer 224 → 151 ms on a family-25 model-1 EPYC (AVX2 only;
    the whole pull-back 0.69 → 0.60 s). Elsewhere (CUDA, float64) ``torch.einsum``.
    """
    n, o = basis.shape[:2]
    basis = basis.reshape(n, o, -1)
    batch = filter_grads.shape[0]
    pairs = filter_grads.reshape(batch, out_fields, o, -1, basis.shape[2])  # (B, x, o, y, r)
    if filter_grads.device.type != "cpu" or filter_grads.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return torch.einsum("bxoyr,nor->bxyn", pairs, basis)
    images = pairs.contiguous().view(batch * out_fields, o, pairs.shape[3], -1).permute(0, 3, 1, 2)  # (B·x, r, o, y)
    kernel = basis.permute(0, 2, 1).unsqueeze(-1).contiguous(memory_format=torch.channels_last)  # (n, r, o, 1)
    out = F.conv2d(images, kernel)  # (B·x, n, 1, y), channels-last
    return out.permute(0, 2, 3, 1).reshape(batch, out_fields, pairs.shape[3], n)


def _basis_transpose(expansion, filter_grads: torch.Tensor) -> torch.Tensor | None:
    """escnn basis expansion transposed, for a batch of filter gradients ``(B, O, I, k, k)``.

    Only for an expansion with one block (one input and one output field type, as in every dpeq
    model): there, filter[x·o, y·i, s] = Σ_n basis[n, o, i, s] · coefficients[x, y, n]. Returns None
    otherwise (the caller takes the generic path). See :func:`basis_contraction`.
    """
    block = single_block_basis(expansion)
    if block is None:
        return None
    basis, out_fields = block  # basis: (n, o, i, *k)
    return basis_contraction(filter_grads, basis, out_fields).reshape(filter_grads.shape[0], -1)


#: Closed-form pull-backs from a layer's effective weight/bias to its parameters, by exact layer type
#: (a subclass may expand its parameters differently): ``pull_back(module, per_example) -> grads | None``.
PULL_BACKS: dict[type, Callable] = {}


def register_pull_back(layer_type: type):
    def register(function):
        PULL_BACKS[layer_type] = function
        return function
    return register


@register_pull_back(WSConv2d)
def _ws_conv_pull_back(module, per_example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    grads = {"weight": standardize_pull_back(module.weight.detach(), per_example["weight"], leading_dims=1, inplace=True)}
    if module.bias is not None:
        grads["bias"] = per_example["bias"]
    return grads


@register_pull_back(StandardizedR2Conv)
def _steerable_pull_back(module, per_example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    coefficients = _basis_transpose(module.basisexpansion, per_example["weight"])
    if coefficients is None:
        return None
    grads = {"weights": standardize_pull_back(module.weights.detach(), coefficients, inplace=True)}
    if module.bias is not None:  # escnn expands a bias per field: bias_expansion @ bias
        grads["bias"] = per_example["bias"] @ module.bias_expansion
    return grads


def closed_form_pull_back(module, per_example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Closed-form pull-back for the layers dpeq builds, or None for the generic path."""
    if not hasattr(module, "expand_parameters"):  # nn.Linear, nn.GroupNorm, nn.Conv2d: used as they are
        return dict(per_example)
    pull_back = PULL_BACKS.get(type(module))
    return None if pull_back is None else pull_back(module, per_example)
