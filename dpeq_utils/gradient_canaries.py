"""White-box auditing with gradient canaries (Steinke, Nasr & Jagielski 2023, Sec. 6; Nasr, Hayes,
Steinke et al. 2023, "Tight Auditing of Differentially Private Machine Learning").

A *Dirac gradient canary* is an individual whose gradient is the clip norm C times a unit vector at
one parameter coordinate, reserved for it. m canaries get m distinct coordinates, drawn at random
over all of the model's parameters; each canary is included with probability 1/2. An included canary
is treated exactly as a training example:

- **sampled** at every step with the run's Poisson rate q (its own stream, the same q the
  accountant uses; the accountant's ε holds per individual whatever the dataset's size, so counting
  the canaries as examples changes neither q nor σ);
- its gradient (norm exactly C, so clipping leaves it unchanged) is **added to the clipped sum** of
  the steps it is sampled in, and the noise and the division by the expected batch size apply to it
  as to every other example (it is added right after Opacus adds the noise to the sum, before the
  update: the same sum, the same noise, the same division).

The reserved coordinates are removed from every real example's per-example gradient *before
clipping* (a fixed, data-independent restriction, as pre-pruning does: the sensitivity stays C), so
the only thing that moves a reserved coordinate is its canary and the noise. With no momentum and no
weight decay, the trained model then reveals, at coordinate j of canary i,

    score_i = −(θ_T[j] − θ_0[j]) · B / (lr · C) = Σ_t (1[i included and sampled at t] + σ·z_t),

the sum of its subsampled Gaussian observations: the strongest white-box view of the mechanism. The
one-run audit (:func:`dpeq_utils.audit.best_audit`) turns these scores into an ε lower bound that
can approach the accountant's ε, where a black-box attack on input canaries stays far below it.

:func:`ideal_scores` draws the same scores from the mechanism itself (no training), so a reader can
see what the best this audit could show for (σ, q, T, m) is, beside what the trained run showed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .runtime import to_device_async


class GradientCanaries:
    """Dirac gradient canaries as a trainer variant (:class:`dpeq_utils.variants.Variant`)."""

    def __init__(self, model: nn.Module, count: int, clip_norm: float, sample_rate: float, batch_size: int,
                 lr: float, private: bool, seed: int = 0):
        names_shapes = [(name, p.numel()) for name, p in model.named_parameters() if p.requires_grad]
        total = sum(n for _, n in names_shapes)
        if not 0 < count <= total // 2:
            raise ValueError(f"{count} gradient canaries: need between 1 and half the model's {total} parameters")
        generator = torch.Generator().manual_seed(20_000 + seed)
        coordinates = torch.randperm(total, generator=generator)[:count].sort().values
        self.included = torch.rand(count, generator=generator) < 0.5
        self.sampler = torch.Generator().manual_seed(30_000 + seed)
        self.count, self.clip_norm, self.sample_rate = count, clip_norm, sample_rate
        self.batch_size, self.lr, self.private = batch_size, lr, private
        # per parameter: (the canaries' indices, the flat positions reserved for them)
        self.slots: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.masks: dict[str, torch.Tensor] = {}
        start = 0
        parameters = dict(model.named_parameters())
        for name, numel in names_shapes:
            inside = (coordinates >= start) & (coordinates < start + numel)
            if inside.any():
                index = inside.nonzero().flatten()
                positions = coordinates[index] - start
                self.slots[name] = (index, positions)
                mask = torch.ones(numel, dtype=parameters[name].dtype)
                mask[positions] = 0
                self.masks[name] = mask.view(parameters[name].shape).to(parameters[name].device)
            start += numel
        self.initial = {name: parameters[name].detach().flatten()[positions].clone()
                        for name, (_, positions) in self.slots.items()}
        self.sampled = torch.zeros(count, dtype=torch.bool)
        self.times_sampled = torch.zeros(count, dtype=torch.long)

    # ------------------------------------------------------------------------------------------ Variant
    def begin_step(self, model: nn.Module) -> None:
        draws = torch.rand(self.count, generator=self.sampler) < self.sample_rate
        self.sampled = self.included & draws
        self.times_sampled += self.sampled

    def gradient_mask(self, name: str) -> torch.Tensor | None:
        return self.masks.get(name)

    @torch.no_grad()
    def before_update(self, model: nn.Module) -> None:
        """Add the sampled canaries' gradients C·e_j (divided by the expected batch size, as the noisy
        sum was). Non-private runs have no per-example step, so the reserved coordinates' real gradient
        is removed here instead."""
        parameters = dict(model.named_parameters())
        for name, (index, positions) in self.slots.items():
            p = parameters[name]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            flat, where = p.grad.view(-1), to_device_async(positions, p.grad.device)
            if not self.private:
                flat[where] = 0
            flat[where] += to_device_async(self.clip_norm * self.sampled[index].to(flat.dtype) / self.batch_size,
                                           flat.device)

    def summary(self, model: nn.Module) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"sampled": self.sampled, "times_sampled": self.times_sampled, "sampler": self.sampler.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.sampled, self.times_sampled = state["sampled"], state["times_sampled"]
        self.sampler.set_state(state["sampler"])

    # ------------------------------------------------------------------------------------------ audit
    def scores(self, model: nn.Module) -> np.ndarray:
        """Each canary's observed sum of its steps' (canary + noise), in units of C (see the module)."""
        scores = torch.zeros(self.count, dtype=torch.float64)
        parameters = dict(model.named_parameters())
        for name, (index, positions) in self.slots.items():
            moved = parameters[name].detach().flatten()[positions].cpu().double() - self.initial[name].cpu().double()
            scores[index] = -moved * self.batch_size / (self.lr * self.clip_norm)
        return scores.numpy()


def ideal_scores(count: int, noise_multiplier: float, sample_rate: float, steps: int,
                 generator: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, included)`` drawn from the mechanism itself: what :meth:`GradientCanaries.scores`
    would give if training were exactly the subsampled Gaussian mechanism (σ, q, T) on m canaries."""
    included = generator.random(count) < 0.5
    sampled = generator.binomial(steps, sample_rate, count) * included
    noise = generator.normal(0.0, noise_multiplier * np.sqrt(steps), count)
    return sampled + noise, included
