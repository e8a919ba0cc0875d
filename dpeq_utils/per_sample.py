"""Per-example gradients: two engines with one interface, and the naive loop they are tested against.

* ``"vmap"`` — whole-model ``torch.func`` (``vmap`` of ``grad``): works for any model, the reference.
  escnn modules take ``GeometricTensor`` inputs and keep their kernel bases as buffers, so Opacus's
  per-layer hooks do not apply to them (``docs/fidelity.md``); ``torch.func`` differentiates the whole forward
  function instead, once per example, vectorised by ``vmap``. It needs the escnn fixes applied when
  :mod:`dpeq_utils.equivariance` is imported.
* ``"hooks"`` — one ordinary batched backward pass for the activations only, then per-layer rules
  (:func:`hooks_per_sample_grads`). A steerable conv's filter is a function of its basis coefficients
  (linear, after the weight standardisation), so its per-example coefficient gradients are the
  transposed Jacobian of that function applied to per-example *filter* gradients: on large maps one
  grouped convolution backward whose groups are the examples, on small maps what Opacus computes
  for ``nn.Conv2d`` (unfold + batched matmul); see :func:`_conv_rule`. ``vmap`` instead makes a
  grouped convolution of every weight gradient over the whole batch of views, slow on a CPU.

:data:`ENGINES` lists the engines, :func:`per_sample_grads` dispatches, ``"auto"`` picks ``hooks``
when every trainable layer of the model has a rule and ``vmap`` otherwise.

An *example* here is one training image with its ``K`` augmentation views: its gradient is the
gradient of the mean loss over its views (De et al. 2022's augmentation multiplicity), so the
views are averaged *before* clipping and still count as one example for privacy.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from escnn import nn as enn
from torch.func import functional_call, grad_and_value, vjp, vmap
from torch.nn.modules.utils import _pair

from . import equivariance  # noqa: F401  (applies the escnn fixes torch.func needs)
from .models.equivariant import StandardizedR2Conv
from .models.layers import WS_EPS, WSConv2d
from .runtime import conv_layout, phase

ENGINES = ("auto", "hooks", "vmap")


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


def _conv_parameters(module: nn.Module) -> tuple[Callable, dict[str, torch.Tensor]]:
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


def _layer_grads(module, per_example_outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Chain rule from per-example gradients of a layer's effective weight/bias to its parameters.

    The generic path vmaps the pull-back of ``expand_parameters``; :func:`_fast_pull_back` does the
    same arithmetic in closed form for dpeq's own layers (about 2× faster on CPU; tested equal).
    """
    fast = _fast_pull_back(module, per_example_outputs)
    if fast is not None:
        return fast
    function, params = _conv_parameters(module)
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
    instead of memory (same formulas; the sums may round differently than in one piece).
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
    rows = max(1, CACHE_SLICE_BYTES // max(1, out[0].numel() * out.element_size()))
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
    if getattr(expansion, "_n_pairs", None) != 1:
        return None
    pair = expansion._representations_pairs[0]
    basis = getattr(expansion, f"block_expansion_{expansion._escape_pair(pair)}").sampled_basis  # (n, o, i, *k)
    return basis_contraction(filter_grads, basis, expansion._out_count[pair[1]]).reshape(filter_grads.shape[0], -1)


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


def _fast_pull_back(module, per_example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Closed-form pull-back for the layers dpeq builds, or None for the generic path."""
    if not hasattr(module, "expand_parameters"):  # nn.Linear, nn.GroupNorm, nn.Conv2d: used as they are
        return dict(per_example)
    pull_back = PULL_BACKS.get(type(module))
    return None if pull_back is None else pull_back(module, per_example)


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
#: small map). At >= 256 pixels it won on every shape tried (3 to 312 channels). Both are exact.
GROUPED_MIN_PIXELS = 256


@register_grad_rule(nn.Conv2d, enn.R2Conv)
def _conv_rule(module, x: torch.Tensor, grad_out: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
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
    method = filter_grads_method(grad_rows.shape[-1])
    return {"weight": method(module, x, grad_out, batch), "bias": grad_rows.sum((1, 3))}


def filter_grads_method(pixels: int) -> Callable:
    """The engine's method for per-example filter gradients on an output map of ``pixels`` pixels
    (:data:`GROUPED_MIN_PIXELS`)."""
    return grouped_filter_grads if pixels >= GROUPED_MIN_PIXELS else unfold_filter_grads


def _kernel_size(module) -> tuple[int, ...]:
    return tuple(module.weight.shape[2:]) if isinstance(module, nn.Conv2d) else (module.kernel_size,) * 2


def grouped_filter_grads(module, x: torch.Tensor, grad_out: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-example filter gradients ``(B, O, I, k, k)`` of a convolution by one grouped convolution
    backward (see :func:`_conv_rule`); ``x`` and ``grad_out`` hold ``batch`` examples' views as rows."""
    kernel = _kernel_size(module)
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
    (see :func:`_conv_rule`)."""
    kernel = _kernel_size(module)
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


def _rule_for(module: nn.Module):
    return next((GRAD_RULES[t] for t in type(module).__mro__ if t in GRAD_RULES), None)


def hooks_supported(model: nn.Module) -> bool:
    """Whether every trainable parameter of ``model`` sits in a layer the hooks engine has a rule for."""
    return not _unsupported_layers(model)


def _trainable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules that own trainable parameters directly, by name."""
    return {name: module for name, module in model.named_modules()
            if any(p.requires_grad for p in module.parameters(recurse=False))}


def _unsupported_layers(model: nn.Module) -> list[str]:
    return [f"{name or 'model'} ({type(module).__name__})" for name, module in _trainable_layers(model).items()
            if _rule_for(module) is None]


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """Parameters temporarily not requiring grad: the backward pass computes activation gradients only."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def capture_layer_io(model: nn.Module, views: torch.Tensor, labels: torch.Tensor
                     ) -> tuple[dict[str, nn.Module], dict[nn.Module, list], torch.Tensor]:
    """The hooks engine's batched pass: every trainable layer's input and output gradient.

    Returns the trainable layers by name, ``{layer: [input, output gradient]}`` (rows are the views of
    the examples in order) and the per-example losses. Forward hooks keep each layer's input and
    catch the gradient of its output; the parameters are frozen during the pass, so autograd computes
    activation gradients only (no summed weight gradients nobody uses).
    """
    batch, k = views.shape[:2]
    captured: dict[nn.Module, list] = {}

    def keep(module, inputs, output):
        if module in captured:
            raise RuntimeError(f"hooks engine: layer {type(module).__name__} ran twice in one forward pass "
                               "(shared weights); use per_sample_engine='vmap'")
        x = inputs[0].tensor if isinstance(inputs[0], enn.GeometricTensor) else inputs[0]
        out = output.tensor if isinstance(output, enn.GeometricTensor) else output
        entry = captured[module] = [x.detach(), None]
        out.register_hook(lambda grad: entry.__setitem__(1, grad))

    layers = _trainable_layers(model)
    handles = [module.register_forward_hook(keep) for module in layers.values()]
    try:
        with _frozen(model):
            with phase("forward"):
                inputs = conv_layout(views.flatten(0, 1)).requires_grad_(True)  # so the first layer's output has a gradient
                logits = model(inputs)
                losses = F.cross_entropy(logits, labels.repeat_interleave(k), reduction="none").view(batch, k).mean(1)
            with phase("activation backward"):
                torch.autograd.grad(losses.sum(), inputs)
    finally:
        for handle in handles:
            handle.remove()
    return layers, captured, losses


def hooks_per_sample_grads(model: nn.Module, views: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-example gradients from one batched backward pass; same contract as :func:`vmap_per_sample_grads`.

    One batched pass captures each trainable layer's input and output gradient
    (:func:`capture_layer_io`). Each layer then turns (input, output gradient) into
    per-example gradients of its parameters: :func:`_conv_rule` for convolutions, an outer product for
    linear layers, normalised-input × gradient for GroupNorm's affine, then the pull-back through
    ``expand_parameters`` (basis expansion, weight standardisation) where the layer has one.
    A layer must run once per forward pass (no weight sharing).
    """
    if views.ndim != 5:
        raise ValueError(f"views must be (B, K, C, H, W), got shape {tuple(views.shape)}")
    unsupported = _unsupported_layers(model)
    if unsupported:
        raise NotImplementedError("the hooks engine has no per-example rule for " + ", ".join(unsupported)
                                  + "; use per_sample_engine='vmap'")
    layers, captured, losses = capture_layer_io(model, views, labels)
    batch = views.shape[0]

    grads = {}
    for layer_name, module in layers.items():
        x, grad_out = captured.pop(module)  # released layer by layer
        with phase("per-example filter gradients"):
            per_example = _rule_for(module)(module, x, grad_out, batch)
        del x, grad_out
        with phase("pull-back (basis, standardisation)"):
            layer_grads = _layer_grads(module, per_example)
        for name, grad in layer_grads.items():
            grads[f"{layer_name}.{name}" if layer_name else name] = grad
    order = [name for name, p in model.named_parameters() if p.requires_grad]
    return {name: grads[name] for name in order}, losses.detach()


def per_sample_grads(model: nn.Module, views: torch.Tensor, labels: torch.Tensor,
                     engine: str = "auto") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-example gradients ``{name: (B, *shape)}`` and losses ``(B,)`` by the named engine."""
    return ENGINE_FUNCTIONS[resolve_engine(engine, model)](model, views, labels)


def resolve_engine(engine: str, model: nn.Module) -> str:
    """The engine ``"auto"`` stands for on ``model`` (``hooks`` where supported), or ``engine`` itself."""
    if engine not in ENGINES:
        raise ValueError(f"per-sample engine must be one of {ENGINES}, got {engine!r}")
    if engine == "auto":
        return "hooks" if hooks_supported(model) else "vmap"
    return engine


ENGINE_FUNCTIONS = {"hooks": hooks_per_sample_grads, "vmap": vmap_per_sample_grads}
