"""Seeds, devices and a report of the environment a run happened in."""

from __future__ import annotations

import platform
import random
import subprocess
from importlib import metadata

import numpy as np
import torch

from .paths import REPO_ROOT

#: Libraries whose versions every run record carries.
TRACKED_LIBRARIES = ("torch", "escnn", "opacus", "numpy", "dpeq")


def set_seed(seed: int) -> int:
    """Seed Python, NumPy and torch (CPU and CUDA); return the seed so callers can record it.

    >>> set_seed(3)
    3
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def pick_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else the CPU; ``"cpu"``/``"cuda"``/``"cuda:1"`` are taken as given.

    >>> pick_device("cpu")
    device(type='cpu')
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda[:N]'") from err
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available here; use 'auto' or 'cpu'")
    return chosen


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str | None:
    """The checkout's commit (with ``+dirty`` when it has uncommitted changes), or None outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def environment_report(device: str | torch.device = "auto") -> dict[str, str]:
    """What a notebook's set-up cell prints: versions, device, commit."""
    chosen = device if isinstance(device, torch.device) else pick_device(device)
    return {**library_versions(), "device": device_name(chosen), "git_commit": git_commit() or "unknown"}
