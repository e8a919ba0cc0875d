"""Check for the exercise of notebook 03: clipping per-example gradients and summing them.

The student's ``clip_and_sum(grads, clip_norm)`` takes per-example gradients (a dict of parameter
name → tensor with the examples on the first axis) and returns the dict of their sums after each
example's gradient, **over all parameters together**, was scaled to norm at most ``clip_norm``. The
check compares with that definition in float64 on gradients of its own, some longer and some shorter
than the clip norm, and names the usual mistakes: clipping each parameter tensor on its own (one
example then moves the sum by up to C·√(number of tensors), not C), scaling short gradients up to C,
and averaging instead of summing (DP-SGD adds the noise to the sum, then divides by the *expected*
batch size).
"""

from __future__ import annotations

import torch

from . import checker


def _gradients() -> dict[str, torch.Tensor]:
    """Six examples' gradients over three parameter tensors, of norms 0.05 to 8 (shorter and longer
    than both clip norms the check uses)."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([0.05, 0.3, 0.45, 2.5, 8.0, 0.8], dtype=torch.float64)
    shapes = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "fc.weight": (10, 16)}
    raw = {name: torch.randn(len(lengths), *shape, dtype=torch.float64, generator=generator)
           for name, shape in shapes.items()}
    norms = torch.cat([g.flatten(1) for g in raw.values()], 1).norm(dim=1)
    return {name: g * (lengths / norms).view(-1, *[1] * (g.ndim - 1)) for name, g in raw.items()}


def _clip_and_sum(grads, clip_norm, per_tensor=False, scale_up=False):
    def factors(norms):
        wanted = clip_norm / norms
        return wanted if scale_up else wanted.clamp(max=1.0)

    if per_tensor:
        return {n: (factors(g.flatten(1).norm(dim=1)).view(-1, *[1] * (g.ndim - 1)) * g).sum(0) for n, g in grads.items()}
    norms = torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1)
    f = factors(norms)
    return {n: (f.view(-1, *[1] * (g.ndim - 1)) * g).sum(0) for n, g in grads.items()}


def _close(a: dict, b: dict) -> bool:
    """Equal up to 1e-5 of each tensor's norm: a ``+ 1e-6`` guard in the norm's denominator is a fine answer."""
    return a.keys() == b.keys() and all(
        float((torch.as_tensor(a[k], dtype=torch.float64) - b[k]).norm()) <= 1e-5 * float(b[k].norm()) for k in a)


@checker("clipping per-example gradients and summing them")
def check_clip_and_sum(clip_and_sum) -> None:
    """``clip_and_sum(grads, clip_norm) -> dict``: Σᵢ gᵢ · min(1, C / ‖gᵢ‖), ‖gᵢ‖ over all parameters."""
    grads = _gradients()
    for clip_norm in (1.0, 0.5):
        given = {k: v.clone() for k, v in grads.items()}
        got = clip_and_sum(given, clip_norm)
        assert isinstance(got, dict) and set(got) == set(grads), \
            f"return a dict with the same keys as the gradients ({sorted(grads)})"
        for name, g in grads.items():
            assert tuple(got[name].shape) == tuple(g.shape[1:]), \
                f"{name}: shape {tuple(got[name].shape)}, expected {tuple(g.shape[1:])} (summed over the examples)"
        if _close(got, _clip_and_sum(grads, clip_norm, per_tensor=True)):
            raise AssertionError("each parameter tensor is clipped on its own: clip each example's gradient as one "
                                 "vector over all parameters, or one example moves the sum by more than C")
        if _close(got, _clip_and_sum(grads, clip_norm, scale_up=True)):
            raise AssertionError("short gradients are scaled up to C: clipping only shortens, min(1, C / ‖g‖)")
        right = _clip_and_sum(grads, clip_norm)
        if _close({k: v * len(next(iter(grads.values()))) for k, v in got.items()}, right):
            raise AssertionError("that is the mean: return the sum (the noise is added to the sum, which is then "
                                 "divided by the expected batch size, not the realised one)")
        assert _close(got, right), f"at C = {clip_norm:g} the sums differ from Σ gᵢ · min(1, C / ‖gᵢ‖)"
