"""Check for the exercise of notebook 01: the C4 lifting convolution written by hand.

The student's ``lifting_conv(images, kernel)`` must equal :func:`dpeq_utils.equivariance.lifting_conv_c4`
on inputs of the check's own (float64, so the comparison is of one computation, not two roundings),
and must have the property section 4 verifies: turning the input by 90° turns every output map and
moves channel r to r + 1. The messages name the usual mistakes (the filter turned clockwise, the
rotation axis in the wrong place, no padding).
"""

from __future__ import annotations

import torch

from . import checker


def _inputs():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 9, 9, dtype=torch.float64, generator=generator)
    kernel = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=generator)  # two filters: the out axis matters
    return images, kernel


@checker("the C4 lifting convolution")
def check_lifting_conv(lifting_conv) -> None:
    """``lifting_conv(images, kernel) -> (batch, out, 4, H, W)``: channel r of the rotation axis holds
    the correlation of ``images`` with ``kernel`` turned by r · 90° counter-clockwise, padded to keep
    the image's size."""
    from ..equivariance import lifting_conv_c4, transform_images

    images, kernel = _inputs()
    got = lifting_conv(images, kernel)
    assert isinstance(got, torch.Tensor), f"return a tensor, not {type(got).__name__}"
    expected = lifting_conv_c4(images, kernel)
    if got.shape != expected.shape:
        if got.shape == (2, 4, 2, 9, 9):
            raise AssertionError("the rotation axis comes after the filter axis: (batch, out, 4, H, W) "
                                 "(torch.stack(..., dim=2))")
        if got.shape[-2:] != images.shape[-2:]:
            raise AssertionError(f"the maps are {tuple(got.shape[-2:])}, the image {tuple(images.shape[-2:])}: "
                                 "pad by kernel_size // 2 so each map keeps the image's size")
        raise AssertionError(f"shape {tuple(got.shape)}, expected {tuple(expected.shape)} = (batch, out, 4, H, W)")
    clockwise = torch.stack([torch.nn.functional.conv2d(images, torch.rot90(kernel, -r, dims=(-2, -1)), padding=1)
                             for r in range(4)], dim=2)
    if torch.allclose(got, clockwise, rtol=1e-10, atol=1e-10) and not torch.allclose(clockwise, expected):
        raise AssertionError("channel r turns the filter clockwise; turn it counter-clockwise, as transform_images "
                             "turns images (torch.rot90(kernel, r, dims=(-2, -1)))")
    turned = lifting_conv(transform_images(images, 1), kernel)
    shifted = torch.roll(transform_images(got, 1), shifts=1, dims=2)
    assert torch.allclose(turned, shifted, rtol=1e-10, atol=1e-10), \
        ("turning the input by 90° does not turn the maps and move channel r to r + 1: is channel r the filter "
         "turned r quarter turns (all four from the same kernel)?")
    worst = float((got - expected).abs().max() / expected.abs().max())
    assert worst < 1e-10, f"equivariant, but the values differ from the reference by {worst:.1e} (relative)"
