"""Shared fixtures. Tests never write into the repository: every dpeq folder points into tmp."""

import pytest
import torch

from dpeq_utils import equivariance


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
    """The package's relative error, with no floor to speak of (float64 comparisons)."""
    return equivariance.relative_error(actual, expected, floor=1e-300)


# ---------------------------------------------------------------------------------------------- shared helpers
SMALL = (4, 8, 16)  # widths of the small models the unit tests build


def small_model(name: str = "eq_resnet9", seed: int = 0):
    """A small model in training mode, initialised from ``seed``."""
    from dpeq_utils.models import build_model

    torch.manual_seed(seed)
    return build_model(name, widths=SMALL).train()


def random_batch(batch: int = 6, views: int = 2, seed: int = 0):
    """``(views, labels)``: random images with ``views`` augmented views each, and random labels."""
    from dpeq_utils.data import augment_views

    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, generator=generator)
    return augment_views(images, views, generator), torch.randint(0, 10, (batch,), generator=generator)


def dp_optimizer(model, sigma: float, clip: float, expected_batch: int, lr: float = 0.1, seed: int = 0):
    """Opacus's DPOptimizer around SGD, as the trainer builds it (``logical_step`` calls the variants'
    ``before_update``)."""
    from opacus.optimizers import DPOptimizer

    return DPOptimizer(torch.optim.SGD(model.parameters(), lr=lr), noise_multiplier=sigma, max_grad_norm=clip,
                       expected_batch_size=expected_batch, loss_reduction="mean",
                       generator=torch.Generator().manual_seed(seed))


def parameters_of(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class CodePayload:
    """What an attacker pickles: unpickling it would run ``exec`` and create ``marker``. Tests plant it
    in checkpoints, dataset files and sweep results and assert that the marker never appears."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)
