"""Groups by name, escnn fixes for ``torch.func``, and measurements of equivariance error.

Groups are named as in the paper: ``"C<N>"`` (the N rotations by multiples of 360°/N) and
``"D<N>"`` (those rotations and the reflections). ``C1`` is the trivial group (a plain CNN
written in escnn's terms), ``D1`` the single reflection.

Importing this module applies two fixes to escnn 1.0.11 that whole-model ``torch.func``
per-sample gradients need (measured; see ``docs/fidelity.md``):

* escnn's basis-expansion modules hash their tensor *contents*; inside ``vmap`` those tensors
  have no storage, and ``Module.named_modules`` hashes every module. They get the identity hash
  of ``torch.nn.Module`` instead (:mod:`dpeq_utils.escnn_compat`, with escnn's other internals).
* ``escnn.nn.GroupPooling`` writes into a preallocated tensor in place, which ``vmap`` rejects;
  dpeq pools regular fields with :func:`group_pool` (a reshape and a max) instead.

Warning:
    Equivariance on the pixel grid is exact only for rotations by multiples of 90° and for
    reflections (they permute pixels). Other angles need interpolation, so even a perfectly
    equivariant network shows an error there: :func:`rotation_error_curve` measures it.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import escnn.gspaces as gspaces
import torch
import torch.nn.functional as F
from escnn.nn import GeometricTensor

from .escnn_compat import apply_torch_func_fixes

GROUPS = ("C1", "C2", "C4", "C8", "C16", "D1", "D2", "D4", "D8")
#: The most rotations a group may have (checked with the config, before any model is built).
MAX_ROTATIONS = 32


apply_torch_func_fixes()


def parse_group(name: str) -> tuple[bool, int]:
    """``"D4"`` → ``(True, 4)`` (has reflections, number of rotations).

    >>> parse_group("C8"), parse_group("D1")
    ((False, 8), (True, 1))
    """
    match = re.fullmatch(r"([CD])([1-9][0-9]*)", str(name))
    if not match:
        raise ValueError(f"unknown group {name!r}: use C<N> or D<N>, e.g. one of {GROUPS}")
    if int(match.group(2)) > MAX_ROTATIONS:
        raise ValueError(f"group {name!r} has more rotations than dpeq builds (at most {MAX_ROTATIONS}): a 3x3 "
                         f"filter cannot resolve finer angles, and the kernel bases and regular fields grow with the "
                         f"group's order (C4096 needs over 13 GB before training starts). Use one of {GROUPS}")
    return match.group(1) == "D", int(match.group(2))


def group_order(name: str) -> int:
    """Number of elements: ``|C_N| = N``, ``|D_N| = 2N``.

    >>> group_order("D4")
    8
    """
    reflections, rotations = parse_group(name)
    return rotations * (2 if reflections else 1)


def make_gspace(name: str) -> gspaces.GSpace2D:
    """The escnn gspace acting on the plane (and so on images) for a group name."""
    reflections, rotations = parse_group(name)
    if reflections:
        return gspaces.flip2dOnR2() if rotations == 1 else gspaces.flipRot2dOnR2(rotations)
    return gspaces.rot2dOnR2(rotations)


def halved_subgroup(name: str) -> tuple[str, object]:
    """The subgroup the paper restricts to after the second stage, and escnn's id for it.

    Halving keeps every second rotation (D4 → D2, C8 → C4); D1 keeps only the identity (D1 → C1).

    >>> halved_subgroup("D4")[0], halved_subgroup("C8")[0], halved_subgroup("D1")[0]
    ('D2', 'C4', 'C1')
    """
    reflections, rotations = parse_group(name)
    if reflections:
        if rotations == 1:
            return "C1", 1
        if rotations % 2:
            raise ValueError(f"{name} has an odd number of rotations and cannot be halved; use restrict=False")
        return f"D{rotations // 2}", (0, rotations // 2)
    if rotations % 2:
        raise ValueError(f"{name} has no subgroup of half its rotations; use restrict=False")
    return f"C{rotations // 2}", rotations // 2


def can_halve(name: str) -> bool:
    """Whether the paper's restriction (:func:`halved_subgroup`) applies to a group.

    >>> [g for g in GROUPS if not can_halve(g)]
    ['C1']
    """
    if name == "C1":
        return False
    try:
        halved_subgroup(name)
    except ValueError:
        return False
    return True


def group_pool(x: torch.Tensor, field_size: int) -> torch.Tensor:
    """Max over each regular field's channels: ``(B, n·|G|, H, W)`` → ``(B, n, H, W)``, invariant.

    A regular field's channels are permuted by the group, so their maximum is invariant.
    """
    batch, channels, height, width = x.shape
    return x.view(batch, channels // field_size, field_size, height, width).amax(2)


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module):
    """Eval mode with current filters and no gradients; the model's previous mode is restored after.

    escnn's ``R2Conv`` expands and caches its filters only when it switches from train to eval mode,
    so a model already in eval mode whose parameters have changed would use stale filters. Passing
    through train mode first rebuilds them.
    """
    was_training = model.training
    model.train()
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------
# measurements


def grid_elements(gspace: gspaces.GSpace2D) -> list:
    """Elements of the gspace's group that act exactly on a square pixel grid (90° multiples, reflections)."""
    exact = []
    for element in gspace.fibergroup.elements:
        quarter_turns = _rotation_angle(element) / (math.pi / 2)
        if abs(quarter_turns - round(quarter_turns)) < 1e-9:
            exact.append(element)
    return exact


def describe_element(gspace: gspaces.GSpace2D, element) -> str:
    """escnn's name of a group element in words, as it acts on an image (:func:`transform_images`).

    escnn writes a rotation by k·360°/N as ``k[2pi/N]`` and a dihedral element as ``(±, k[2pi/N])``,
    where ``-`` means "mirror left-right first"; in the reflection-only group D1 (escnn's C2 acting by
    a flip) ``1[2pi/2]`` is the mirror, not a 180° turn.

    >>> gs = make_gspace("D4"); [describe_element(gs, e) for e in list(gs.fibergroup.elements)[4:6]]
    ['mirror left-right', 'mirror left-right, then rotate 90°']
    """
    value = element.to("radians")
    if gspace.flips_order and gspace.rotations_order == 1:  # D1: the one non-identity element is the mirror
        flip, angle = bool(round(float(value) / math.pi)), 0.0
    elif isinstance(value, tuple):
        flip, angle = bool(value[0]), float(value[1])
    else:
        flip, angle = False, float(value)
    degrees = math.degrees(angle)
    turn = f"rotate {degrees:.0f}°" if abs(degrees - round(degrees)) < 1e-9 else f"rotate {degrees:.1f}°"
    if not flip:
        return "identity" if degrees == 0 else turn
    return "mirror left-right" if degrees == 0 else f"mirror left-right, then {turn}"


def lifting_conv_c4(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """A C4 group convolution written out by hand (the "lifting" layer of Cohen & Welling 2016): the
    one learned ``kernel`` (out, in, k, k), correlated with ``images`` at each of its four quarter
    turns, gives an output with a new axis for the rotation: (batch, out, 4, H, W). Channel r holds
    the response of the filter turned by r·90°. Rotating the input by 90° rotates every map and moves
    channel r to r+1 (a cyclic shift: the regular representation of C4)."""
    turned = [torch.rot90(kernel, r, dims=(-2, -1)) for r in range(4)]
    padding = kernel.shape[-1] // 2
    return torch.stack([F.conv2d(images, k, padding=padding) for k in turned], dim=2)


def _rotation_angle(element) -> float:
    value = element.to("radians")
    return float(value[1] if isinstance(value, tuple) else value)


def relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-12) -> float:
    """‖actual − expected‖ / ‖expected‖ (the denominator at least ``floor``)."""
    return float((actual - expected).norm() / expected.norm().clamp_min(floor))


@dataclass
class EquivarianceResult:
    stage: str
    element: str
    relative_error: float


def feature_equivariance_errors(model: torch.nn.Module, x: torch.Tensor) -> list[EquivarianceResult]:
    """``‖f(g·x) − g·f(x)‖ / ‖g·f(x)‖`` for every feature map ``f`` the model exposes and every
    grid-exact element ``g`` of the group that feature map is equivariant to.

    The model must offer ``input_type`` (escnn field type of its input) and ``feature_maps(x)``
    (a dict of name → :class:`escnn.nn.GeometricTensor`); feature maps after a restriction carry
    the subgroup's field type and are tested only on the subgroup's elements.
    """
    with evaluation_mode(model):
        reference = model.feature_maps(x)
        results = []
        for g in grid_elements(model.input_type.gspace):
            moved = model.feature_maps(GeometricTensor(x, model.input_type).transform(g).tensor)
            for stage, feature in reference.items():
                element = _as_element_of(g, feature.type.gspace, model.input_type.gspace)
                if element is None:
                    continue
                expected = feature.transform(element).tensor
                results.append(EquivarianceResult(stage, str(g), relative_error(moved[stage].tensor, expected)))
        return results


def _as_element_of(g, sub_gspace, parent_gspace):
    """``g`` seen as an element of the (sub)group ``sub_gspace`` acts by, or None if it is not in it."""
    if sub_gspace == parent_gspace:
        return g
    restriction = getattr(sub_gspace, "_dpeq_restriction", None)
    if restriction is None:
        raise ValueError("feature map on a subgroup without a recorded restriction map; build it with "
                         "dpeq_utils.models.equivariant.restrict_field_type")
    return restriction(g)


def transform_images(x: torch.Tensor, rotation_quarter_turns: int = 0, flip: bool = False) -> torch.Tensor:
    """Rotate images by multiples of 90° (counter-clockwise) and optionally mirror them left-right first."""
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, rotation_quarter_turns, dims=(-2, -1))


def rotation_consistency(model: torch.nn.Module, x: torch.Tensor, rotation_quarter_turns: int = 1) -> dict[str, float]:
    """How a classifier's outputs change when its inputs turn by 90°, set against how much they
    change between *different* images: a network whose logits barely depend on the image (a
    near-constant classifier) has a tiny rotation error without having learned anything.

    Returns ``error vs norm`` (‖f(g·x) − f(x)‖ / ‖f(x)‖, as :func:`invariance_error`), ``error vs
    spread`` (the same difference over ‖f(x) − mean f(x)‖, the spread of the logits between images),
    ``same prediction`` (share of images whose predicted class the turn leaves unchanged) and
    ``majority share`` (share of images given the most common class)."""
    with evaluation_mode(model), torch.no_grad():
        logits = model(x)
        turned = model(transform_images(x, rotation_quarter_turns))
    difference = float(torch.linalg.vector_norm(turned - logits))
    spread = float(torch.linalg.vector_norm(logits - logits.mean(0, keepdim=True)))
    predicted = logits.argmax(1)
    return {"error vs norm": difference / max(float(torch.linalg.vector_norm(logits)), 1e-12),
            "error vs spread": difference / max(spread, 1e-12),
            "same prediction": float((turned.argmax(1) == predicted).float().mean()),
            "majority share": float(torch.bincount(predicted).max()) / len(predicted)}


def invariance_error(model: torch.nn.Module, x: torch.Tensor, rotation_quarter_turns: int = 1, flip: bool = False) -> float:
    """``‖model(g·x) − model(x)‖ / ‖model(x)‖`` for a 90°-multiple rotation and/or a reflection."""
    with evaluation_mode(model):
        return relative_error(model(transform_images(x, rotation_quarter_turns, flip)), model(x))


def logit_invariance_errors(model: torch.nn.Module, x: torch.Tensor, gspace=None) -> list[tuple[str, float]]:
    """``invariance_error`` of the logits for every grid-exact element of ``gspace``
    (default: the group the model's input type carries)."""
    gspace = gspace or model.input_type.gspace
    input_type = gspace.type(*[gspace.trivial_repr] * x.shape[1])
    with evaluation_mode(model):
        base = model(x)
        return [(str(g), relative_error(model(GeometricTensor(x, input_type).transform(g).tensor), base))
                for g in grid_elements(gspace) if g != gspace.fibergroup.identity]


def rotate_images(x: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate images by an arbitrary angle (radians, counter-clockwise) with bilinear interpolation,
    keeping only the disc inscribed in the image (corners would leave the grid)."""
    batch, _, height, width = x.shape
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[cos, sin, 0.0], [-sin, cos, 0.0]], dtype=x.dtype, device=x.device).expand(batch, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    rotated = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return rotated * disc_mask(height, width, x)


def disc_mask(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    ys = torch.linspace(-1, 1, height, dtype=like.dtype, device=like.device)
    xs = torch.linspace(-1, 1, width, dtype=like.dtype, device=like.device)
    return ((ys[:, None] ** 2 + xs[None, :] ** 2) <= 1).to(like.dtype)


def rotation_error_curve(model: torch.nn.Module, x: torch.Tensor, angles_deg=range(0, 361, 15)) -> list[tuple[float, float]]:
    """Invariance error of the logits against rotation angle (inputs masked to a disc so that only
    interpolation, not cropping, separates the angles). Exact (≈1e-6) at multiples of 90° for a
    model with an invariant head, larger in between."""
    masked = x * disc_mask(x.shape[-2], x.shape[-1], x)
    with evaluation_mode(model):
        base = model(masked)
        return [(float(a), relative_error(model(rotate_images(masked, math.radians(a))), base)) for a in angles_deg]
