"""Plain (non-equivariant) baselines, all DP-compatible (GroupNorm, no batch statistics).

* :class:`PlainResNet9` — the equivariant ResNet-9's topology with ordinary convolutions
  (weight-standardised, like the steerable ones). Built either with the *same tensor widths* as an
  equivariant model (channels = fields × field size: same activations, many more parameters) or
  *parameter-matched* (widths scaled until the parameter count matches).
* :class:`WideResNet` — WRN-16-4 with GroupNorm (16 groups) and weight standardisation, the
  architecture of De et al. 2022's CIFAR-10 results.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import WSConv2d, check_head, head_features, mish, norm_groups, pool_for_head


class PlainBlock(nn.Module):
    """WS conv 3×3 → Mish → GroupNorm (no affine) → optional 2×2 max pool."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int, pool: bool):
        super().__init__()
        self.conv = WSConv2d(in_channels, out_channels, 3, padding=1, bias=True)
        self.norm = nn.GroupNorm(norm_groups(out_channels, num_groups), out_channels, affine=False)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(mish(self.conv(x)))
        return F.max_pool2d(x, 2) if self.pool else x


class PlainResNet9(nn.Module):
    """ResNet-9 with channels ``(c1, c2, c3, c4)`` for conv1, conv2/res1, conv3, conv4/res2."""

    def __init__(self, channels=(48, 104, 312, 156), num_groups: int = 8, head: str = "pool2x2",
                 num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        c1, c2, c3, c4 = (int(c) for c in channels)
        if min(c1, c2, c3, c4) < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        check_head(head)
        self.channels, self.head_kind = (c1, c2, c3, c4), head
        self.conv1 = PlainBlock(in_channels, c1, num_groups, pool=False)
        self.conv2 = PlainBlock(c1, c2, num_groups, pool=True)
        self.res1 = nn.Sequential(PlainBlock(c2, c2, num_groups, False), PlainBlock(c2, c2, num_groups, False))
        self.norm1 = nn.GroupNorm(norm_groups(c2, num_groups), c2, affine=False)
        self.conv3 = PlainBlock(c2, c3, num_groups, pool=True)
        self.conv4 = PlainBlock(c3, c4, num_groups, pool=True)
        self.res2 = nn.Sequential(PlainBlock(c4, c4, num_groups, False), PlainBlock(c4, c4, num_groups, False))
        self.norm2 = nn.GroupNorm(norm_groups(c4, num_groups), c4, affine=False)
        self.classifier = nn.Linear(head_features(c4, head), num_classes)

    def _trunk(self, x: torch.Tensor, keep: dict | None = None) -> torch.Tensor:
        x = self.conv2(self.conv1(x))
        x = self.norm1(self.res1(x) + x)
        if keep is not None:
            keep["stage1"] = x
        x = self.conv3(x)
        if keep is not None:
            keep["stage2"] = x
        x = self.conv4(x)
        x = self.norm2(self.res2(x) + x)
        if keep is not None:
            keep["stage3"] = x
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(pool_for_head(self._trunk(x), self.head_kind))

    def feature_maps(self, x: torch.Tensor) -> dict:
        """Feature maps after each stage (plain tensors: no group acts on them)."""
        keep: dict = {}
        self._trunk(x, keep)
        return keep


class WideBlock(nn.Module):
    """Pre-activation wide residual block: GN → ReLU → WS conv → GN → ReLU → WS conv, plus shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups(in_channels, groups), in_channels)
        self.conv1 = WSConv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(norm_groups(out_channels, groups), out_channels)
        self.conv2 = WSConv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = (WSConv2d(in_channels, out_channels, 1, stride=stride, bias=False)
                         if stride != 1 or in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.norm2(out)))
        return out + skip


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis 2016) with GroupNorm and weight standardisation (De et al. 2022).

    Stage widths are ``base_widths`` times ``width`` after a stem of ``base_widths[0]`` channels; the
    default ``(16, 32, 64)`` is the published WRN-16-4 (16 → 64, 128, 256 channels).
    """

    def __init__(self, depth: int = 16, width: int = 4, num_groups: int = 16, num_classes: int = 10, in_channels: int = 3,
                 base_widths=(16, 32, 64)):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        if width < 1:
            raise ValueError(f"WRN width must be >= 1, got {width}")
        blocks = (depth - 4) // 6
        b0, b1, b2 = (int(b) for b in base_widths)
        widths = (b0, b0 * width, b1 * width, b2 * width)
        self.stem = WSConv2d(in_channels, widths[0], 3, padding=1, bias=False)
        layers = []
        for stage in range(3):
            for block in range(blocks):
                in_ch = widths[stage] if block == 0 else widths[stage + 1]
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(WideBlock(in_ch, widths[stage + 1], stride, num_groups))
        self.blocks = nn.Sequential(*layers)
        self.norm = nn.GroupNorm(norm_groups(widths[3], num_groups), widths[3])
        self.classifier = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.blocks(self.stem(x))))
        return self.classifier(x.mean((2, 3)))
