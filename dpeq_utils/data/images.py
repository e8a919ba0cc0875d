"""The in-memory dataset type (uint8 images, int64 labels), its content digest and normalisation.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import DpeqError


class DatasetError(DpeqError, RuntimeError):
    """A dataset could not be found, fetched or read; the message says what to do."""


@dataclass
class ImageDataset:
    """Images as uint8 ``(N, 3, H, W)``, labels as int64 ``(N,)``, plus normalisation constants."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str = ""
    meta: dict = field(default_factory=dict)
    # copies of this dataset on other devices, made once by on()
    _placed: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def digest(self) -> str:
        """SHA-256 of the examples (pixels, then labels): what a run record says it trained on."""
        return content_digest(self.images.numpy(), self.labels.numpy())

    def subset(self, size: int | None, seed: int = 0) -> "ImageDataset":
        """A seeded random subset of ``size`` examples (all of them when ``size`` is None)."""
        if size is None or size == len(self):
            return self
        if not 0 < size <= len(self):
            raise ValueError(f"subset size must be in 1..{len(self)} for {self.name!r}, got {size}")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:size]
        order = order.sort().values
        return ImageDataset(self.images[order], self.labels[order], self.classes, self.mean, self.std, self.name,
                            {**self.meta, "subset_of": len(self), "subset_seed": seed})

    def take(self, index: torch.Tensor, part: str) -> "ImageDataset":
        """The examples at ``index`` (a named part of this set: ``meta`` records which and how many)."""
        return ImageDataset(self.images[index], self.labels[index], self.classes, self.mean, self.std, self.name,
                            {**self.meta, "part": part, "part_of": len(self)})

    def on(self, device: torch.device | str) -> "ImageDataset":
        """This dataset with its images and labels on ``device``: itself on the CPU, elsewhere a copy made
        on first use and kept (uint8 images: 150 MB for all of CIFAR-10), so that steps and evaluations
        index it on the device instead of copying images from the host each time."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        if device not in self._placed:
            self._placed[device] = ImageDataset(self.images.to(device), self.labels.to(device), self.classes,
                                                self.mean, self.std, self.name, self.meta)
        return self._placed[device]

    def normalized(self, index: torch.Tensor | slice | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """Float images in ``[0, 1]`` scaled to zero mean / unit std per channel, on ``device`` (default:
        where the images are); ``index`` selects examples (a tensor on that device, or a slice)."""
        data = self if device is None else self.on(device)
        images = data.images if index is None else data.images[index]
        return normalize(images, self.mean, self.std)


def content_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of uint8 pixels followed by int64 little-endian labels."""
    digest = hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    digest.update(np.asarray(labels).astype("<i8").tobytes())
    return digest.hexdigest()


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 ``(..., 3, H, W)`` → float32, per-channel ``(x/255 - mean) / std``."""
    return (images.float() / 255.0 - _channel_constant(tuple(mean), images.device)) / _channel_constant(tuple(std),
                                                                                                     images.device)


@functools.lru_cache(maxsize=64)
def _channel_constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """Per-channel constants as a float32 ``(C, 1, 1)`` tensor on ``device``, built once per device (on a
    GPU, building it from Python numbers at every call is a blocking copy)."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1).to(device)


# ----------------------------------------------------------------------------------------------
# dataset by name
