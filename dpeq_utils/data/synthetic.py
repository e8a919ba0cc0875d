"""The synthetic dataset: one glyph per class, seen at a random rotation and reflection.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..runtime import derived_seeds
from .images import ImageDataset

#: Normalisation of the synthetic data: per-channel mean and std of 20,000 images generated from
#: seed 987654, a stream no run trains on. Fixed constants, like CIFAR-10's, so that no statistic of
#: a private training split enters the model (``tests/test_data.py`` recomputes them).
SYNTHETIC_MEAN = (0.4099, 0.4101, 0.4092)
SYNTHETIC_STD = (0.1511, 0.1512, 0.1512)
SYNTHETIC_STATS_SEED = 987654

_GLYPH_GRID = 7
_GLYPH_CELLS = 11
_GLYPH_SCALE = 3
_GLYPH_SEED = 20231126  # fixed: the classes are the same for every data seed


def _d4_orbit(glyph: np.ndarray) -> list[np.ndarray]:
    orbit = []
    for flipped in (glyph, glyph[:, ::-1]):
        for k in range(4):
            orbit.append(np.rot90(flipped, k))
    return orbit


def _random_connected_glyph(rng: np.random.Generator) -> np.ndarray:
    grid = np.zeros((_GLYPH_GRID, _GLYPH_GRID), dtype=bool)
    cells = [(_GLYPH_GRID // 2, _GLYPH_GRID // 2)]
    grid[cells[0]] = True
    while len(cells) < _GLYPH_CELLS:
        r, c = cells[rng.integers(len(cells))]
        dr, dc = ((0, 1), (1, 0), (0, -1), (-1, 0))[rng.integers(4)]
        r, c = r + dr, c + dc
        if 0 <= r < _GLYPH_GRID and 0 <= c < _GLYPH_GRID and not grid[r, c]:
            grid[r, c] = True
            cells.append((r, c))
    return grid


def synthetic_glyphs(num_classes: int = 10, min_distance: int = 6) -> np.ndarray:
    """The class glyphs: ``(num_classes, 7, 7)`` bool, pairwise at least ``min_distance`` cells apart
    under every rotation and reflection (so no class is a transformed copy of another)."""
    rng = np.random.default_rng(_GLYPH_SEED)
    glyphs: list[np.ndarray] = []
    while len(glyphs) < num_classes:
        candidate = _random_connected_glyph(rng)
        # centre the glyph's bounding box so rotation about the image centre keeps it in frame
        rows, cols = np.nonzero(candidate)
        candidate = np.roll(candidate, (_GLYPH_GRID // 2 - (rows.min() + rows.max()) // 2,
                                        _GLYPH_GRID // 2 - (cols.min() + cols.max()) // 2), axis=(0, 1))
        if all(min(int((candidate != t).sum()) for t in _d4_orbit(g)) >= min_distance for g in glyphs):
            glyphs.append(candidate)
    return np.stack(glyphs)


def _smooth_noise(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    coarse = torch.rand(n, 3, 4, 4, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _render_synthetic(n: int, generator: torch.Generator, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    glyphs = torch.from_numpy(synthetic_glyphs()).float()
    labels = torch.randint(0, len(glyphs), (n,), generator=generator)
    glyph_px = _GLYPH_GRID * _GLYPH_SCALE
    masks = F.interpolate(glyphs[labels].unsqueeze(1), scale_factor=_GLYPH_SCALE, mode="nearest")
    pad = (size - glyph_px) // 2
    masks = F.pad(masks, (pad, size - glyph_px - pad, pad, size - glyph_px - pad))

    angle = torch.rand(n, generator=generator) * 2 * torch.pi
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2.0 * 2 / size)  # ±2 px in [-1, 1] units
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, size, size), align_corners=False)
    masks = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    background = 0.15 + 0.5 * _smooth_noise(n, size, generator)
    hue = torch.rand(n, 3, 1, 1, generator=generator)
    # foreground far from the background's mean so the glyph stays visible
    foreground = torch.where(background.mean((1, 2, 3), keepdim=True) < 0.4, 0.6 + 0.4 * hue, 0.4 * hue)
    images = background * (1 - masks) + foreground * masks
    images = images + 0.05 * torch.randn(images.shape, generator=generator)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels


def make_synthetic(train_size: int = 5000, test_size: int = 1000, seed: int = 0,
                   split_index: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Deterministic glyphs-at-random-orientations data (see the module docstring).

    >>> a, _ = make_synthetic(8, 4, seed=1); b, _ = make_synthetic(8, 4, seed=1)
    >>> bool(torch.equal(a.images, b.images)), tuple(a.images.shape)
    (True, (8, 3, 32, 32))
    """
    for split, size in (("train_size", train_size), ("test_size", test_size)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{split} must be a positive integer, got {size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    splits = []
    # distinct, reproducible streams for every (seed, split); split_index=2 makes a validation split
    for index, size in zip((split_index, split_index + 1) if split_index else (0, 1), (train_size, test_size)):
        stream = derived_seeds([seed, index], 1)[0]
        splits.append(_render_synthetic(size, torch.Generator().manual_seed(stream)))
    (train_x, train_y), (test_x, test_y) = splits
    mean, std = SYNTHETIC_MEAN, SYNTHETIC_STD  # fixed: never statistics of the (private) training split
    classes = tuple(f"glyph{i}" for i in range(10))
    meta = {"seed": seed, "origin": "generated by dpeq_utils.data.make_synthetic", "verified": "deterministic generator"}
    return (ImageDataset(train_x, train_y, classes, mean, std, "synthetic", meta),
            ImageDataset(test_x, test_y, classes, mean, std, "synthetic", meta))


# ----------------------------------------------------------------------------------------------
# CIFAR-10
