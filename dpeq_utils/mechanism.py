"""The mechanism, measured: how large the averaged clipped gradient (the signal DP-SGD keeps) is
against the noise it adds, on real examples of a real model.

The usual back-of-the-envelope divides the noise norm σ·C·√d / B by the clip norm C, the largest
signal possible. The real signal is far smaller: clipped per-example gradients point in nearly
unrelated directions (their mean pairwise cosine is close to 0), so their average is short. This
module measures it:

- ``signal_norm``: an unbiased estimate of ‖E[clip(g)]‖ from n clipped per-example gradients, the
  square root of the mean of their off-diagonal inner products (the diagonal, each gradient with
  itself, would add ‖clip(g)‖² / n of pure sampling noise);
- ``mean_cosine``: the mean pairwise cosine of the clipped gradients;
- ``noise_norm``: the expected norm of one step's noise after the division by B, σ·C·√d / B;
- ``noise_to_signal``: their ratio — how many times longer the noise is than what it hides.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .per_sample import per_sample_grads


@torch.no_grad()
def _gram(flat: torch.Tensor) -> torch.Tensor:
    return flat.double() @ flat.double().T


def mean_length_unbiased(vectors: torch.Tensor) -> float:
    """An unbiased estimate of ‖E[v]‖ from n rows ``vectors`` (n ≥ 2): the square root of the mean of
    their off-diagonal inner products (0 where that mean is negative)."""
    return _length_from_gram(_gram(vectors))


def _length_from_gram(gram: torch.Tensor) -> float:
    n = len(gram)
    off_diagonal = (gram.sum() - gram.diagonal().sum()) / (n * (n - 1))
    return math.sqrt(max(float(off_diagonal), 0.0))


def signal_and_noise(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, clip_norm: float,
                     noise_multiplier: float, batch_size: int, engine: str = "auto") -> dict[str, float]:
    """Measure the clipped signal of ``images`` (one view each) under ``model`` against one step's
    noise at (σ = ``noise_multiplier``, C = ``clip_norm``, expected batch ``batch_size``)."""
    if len(images) < 2:
        raise ValueError("the signal estimate needs at least two examples")
    grads, _ = per_sample_grads(model, images.unsqueeze(1), labels, engine)
    flat = torch.cat([g.detach().flatten(1) for g in grads.values()], 1)
    norms = flat.norm(dim=1)
    clipped = flat * (clip_norm / (norms + 1e-6)).clamp(max=1.0).unsqueeze(1)
    gram = _gram(clipped)
    n, d = len(clipped), clipped.shape[1]
    lengths = gram.diagonal().sqrt()
    cosines = gram / (lengths[:, None] * lengths[None, :]).clamp(min=1e-300)
    mean_cosine = (cosines.sum() - cosines.diagonal().sum()) / (n * (n - 1))
    signal = _length_from_gram(gram)  # the Gram matrix the cosines use, computed once
    noise = noise_multiplier * clip_norm * math.sqrt(d) / batch_size
    return {"parameters": d, "examples": n, "median gradient norm": float(norms.median()),
            "clipped": float((norms > clip_norm).float().mean()), "signal_norm": signal,
            "mean_cosine": float(mean_cosine), "noise_norm": noise,
            "noise_to_signal": noise / signal if signal > 0 else math.inf,
            "noise_to_max_signal": noise / clip_norm}
