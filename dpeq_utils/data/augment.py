"""Augmentation multiplicity (De et al. 2022): K views of each example, flip and reflect-padded crop,
drawn per logical step from the augmentation stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ViewDraws:
    """The random part of ``K-1`` augmented views per example: crop offsets and flips, ``(B, K-1)`` each.

    Drawn once per logical batch (:func:`draw_views`) and sliced per physical chunk, so the views
    an example gets do not depend on how the batch is split for memory.
    """

    offset_y: torch.Tensor
    offset_x: torch.Tensor
    flip: torch.Tensor

    def __getitem__(self, index) -> "ViewDraws":
        return ViewDraws(self.offset_y[index], self.offset_x[index], self.flip[index])

    def __len__(self) -> int:
        return self.offset_y.shape[0]

    def to(self, device: torch.device) -> "ViewDraws":
        """The draws on ``device``, copied without blocking the host (:func:`dpeq_utils.runtime.to_device_async`)."""
        from ..runtime import to_device_async

        return ViewDraws(*(to_device_async(t, device) for t in (self.offset_y, self.offset_x, self.flip)))


def draw_views(batch: int, aug_mult: int, generator: torch.Generator | None = None, padding: int = 4) -> ViewDraws:
    """Crop offsets in ``0..2*padding`` and flip bits for ``aug_mult - 1`` views of ``batch`` examples,
    drawn on the CPU (the same stream on every device)."""
    if not isinstance(aug_mult, int) or aug_mult < 1:
        raise ValueError(f"aug_mult must be an integer >= 1, got {aug_mult!r}")
    shape = (batch, aug_mult - 1)
    return ViewDraws(torch.randint(0, 2 * padding + 1, shape, generator=generator),
                     torch.randint(0, 2 * padding + 1, shape, generator=generator),
                     torch.rand(shape, generator=generator) < 0.5)


def apply_views(images: torch.Tensor, draws: ViewDraws, padding: int = 4) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, K, C, H, W)``: the original, then one view per drawn crop and flip of the
    reflect-padded image."""
    batch, channels, height, width = images.shape
    extra = draws.offset_y.shape[1] if draws.offset_y.ndim == 2 else 0
    if len(draws) != batch:
        raise ValueError(f"{batch} images but view draws for {len(draws)}")
    if extra == 0:
        return images.unsqueeze(1)
    if batch == 0:
        return images.new_zeros(0, extra + 1, channels, height, width)
    device = images.device
    offset_y, offset_x, flip = (t.reshape(-1, 1).to(device) for t in (draws.offset_y, draws.offset_x, draws.flip))
    padded = F.pad(images, (padding,) * 4, mode="reflect").repeat_interleave(extra, dim=0)
    rows = offset_y + torch.arange(height, device=device)
    cols = offset_x + torch.arange(width, device=device)
    cols = torch.where(flip, cols.flip(1), cols)
    views = padded[torch.arange(batch * extra, device=device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    views = views.permute(0, 3, 1, 2).reshape(batch, extra, channels, height, width)
    return torch.cat([images.unsqueeze(1), views], dim=1)


def augment_views(images: torch.Tensor, aug_mult: int, generator: torch.Generator | None = None, padding: int = 4) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, K, C, H, W)``: the original plus ``K-1`` independently drawn views, each a
    random crop of the reflect-padded image with a random horizontal flip (De et al. 2022; Hölzl et al. 2023).
    :func:`draw_views` then :func:`apply_views`; ``generator`` must be a CPU generator.

    >>> x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    >>> v = augment_views(x, 3, torch.Generator().manual_seed(0))
    >>> tuple(v.shape), bool(torch.equal(v[:, 0], x))
    ((2, 3, 3, 8, 8), True)
    """
    return apply_views(images, draw_views(images.shape[0], aug_mult, generator, padding), padding)
