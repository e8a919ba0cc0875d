"""Datasets by name, and the train / validation / test splits a run trains on.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from .cifar10 import load_cifar10
from .images import ImageDataset
from .synthetic import make_synthetic

DATASETS = ("synthetic", "cifar10")
#: Full training-set size of each dataset (synthetic: the default generated size).
TRAIN_SIZES = {"synthetic": 5000, "cifar10": 50_000}
#: Largest training (validation included) and test sizes per dataset: CIFAR-10's own; the synthetic
#: generator's limit, which keeps its float work within a few GB.
MAX_SIZES = {"synthetic": (50_000, 50_000), "cifar10": (50_000, 10_000)}

class Splits(NamedTuple):
    """The splits of one run: training, test, and an optional validation split held out of training."""

    train: ImageDataset
    test: ImageDataset
    validation: ImageDataset | None = None


#: Seed of the validation split: fixed, so every run seed and model is tuned on the same examples.
VALIDATION_SEED = 20231126


def on_disk(name: str) -> bool:
    """Whether dataset ``name`` can be loaded without a download (synthetic data always can)."""
    from .cifar10 import cifar10_on_disk

    return name != "cifar10" or cifar10_on_disk()


def load_splits(
    name: str,
    *,
    train_size: int | None = None,
    test_size: int | None = None,
    validation_size: int = 0,
    seed: int = 0,
    source: str | os.PathLike | None = None,
    download: bool = True,
) -> Splits:
    """Train, test and validation splits of a dataset by name (see the module docstring).

    ``validation_size`` examples are held out of the *training* set by a fixed permutation (the same
    for every run seed), so learning rates can be chosen without looking at the test set; the
    training subset (``train_size``, drawn with ``seed``) comes from the remaining examples.
    ``test_size`` takes a seeded subset of the test set. Synthetic data is generated at those sizes
    directly (the validation split as a third independent stream). ``source`` points at a local
    CIFAR-10 copy; ``download=False`` forbids the network.
    """
    if isinstance(validation_size, bool) or not isinstance(validation_size, int) or validation_size < 0:
        raise ValueError(f"validation_size must be an integer >= 0, got {validation_size!r}")
    if name == "synthetic":
        train, test = make_synthetic(train_size or TRAIN_SIZES["synthetic"], test_size or 1000, seed=seed)
        validation = None
        if validation_size:
            validation = make_synthetic(validation_size, 1, seed=seed, split_index=2)[0]
        return Splits(train, test, validation)
    if name == "cifar10":
        train, test = load_cifar10(source, download=download)
        validation = None
        if validation_size:
            if validation_size >= len(train):
                raise ValueError(f"validation_size={validation_size} leaves no training example of {len(train)}")
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(VALIDATION_SEED))
            validation = train.take(order[:validation_size].sort().values, "validation")
            train = train.take(order[validation_size:].sort().values, "train")
        return Splits(train.subset(train_size, seed), test.subset(test_size, seed), validation)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


def load_dataset(name: str, *, train_size: int | None = None, test_size: int | None = None, seed: int = 0,
                 source: str | os.PathLike | None = None, download: bool = True) -> tuple[ImageDataset, ImageDataset]:
    """Train and test splits (:func:`load_splits` without a validation split)."""
    splits = load_splits(name, train_size=train_size, test_size=test_size, seed=seed, source=source, download=download)
    return splits.train, splits.test


# ----------------------------------------------------------------------------------------------
# synthetic: glyphs at random orientations
