"""The hooks engine (one batched backward, then per-layer rules and pull-backs) and the dispatch
between engines.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from escnn import nn as enn

from .. import equivariance  # noqa: F401  (applies the escnn fixes torch.func needs)
from ..runtime import conv_layout, phase
from .functional import vmap_per_sample_grads
from .pull_backs import pull_back_to_parameters
from .rules import rule_for

ENGINES = ("auto", "hooks", "vmap")



def hooks_supported(model: nn.Module) -> bool:
    """Whether every trainable parameter of ``model`` sits in a layer the hooks engine has a rule for."""
    return not _unsupported_layers(model)


def _trainable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules that own trainable parameters directly, by name."""
    return {name: module for name, module in model.named_modules()
            if any(p.requires_grad for p in module.parameters(recurse=False))}


def _unsupported_layers(model: nn.Module) -> list[str]:
    return [f"{name or 'model'} ({type(module).__name__})" for name, module in _trainable_layers(model).items()
            if rule_for(module) is None]


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
    per-example gradients of its parameters: :func:`conv_rule` for convolutions, an outer product for
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
            per_example = rule_for(module)(module, x, grad_out, batch)
        del x, grad_out
        with phase("pull-back (basis, standardisation)"):
            layer_grads = pull_back_to_parameters(module, per_example)
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
