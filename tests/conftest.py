"""Shared fixtures. Tests never write into the repository: every dpeq folder points into tmp."""

import pytest
import torch


@pytest.fixture(autouse=True)
def isolated_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("DPEQ_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DPEQ_FIGURES_DIR", str(tmp_path / "figures"))
    monkeypatch.setenv("DPEQ_REFERENCE_DIR", str(tmp_path / "reference"))  # tests that need the shipped ones unset it
    monkeypatch.delenv("DPEQ_CIFAR10", raising=False)
    monkeypatch.delenv("DPEQ_RUNS_DIR", raising=False)
    monkeypatch.delenv("DPEQ_CACHE_DIR", raising=False)
    yield


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))
