"""DP-SGD variants the paper's neighbours use to make DP training cheaper or better, as options of
the one trainer (same sampler, accountant and data as every other run).

* **Pre-pruning + gradient dropping** (Adamczewski et al. 2023, :class:`CoordinateSelector`): a mask
  fixed before training removes ``prune_rate`` of every parameter tensor (at random, or the smallest
  *initial* weights: a function of the seed, never of private data); at every step a further
  ``drop_rate`` of the remaining coordinates is frozen (at random, or the smallest coordinates of the
  current DP iterate: post-processing of released values). Per-example gradients are restricted to
  the kept coordinates *before* clipping, and noise lands only there. Accounting is plain DP-SGD
  with the same (q, σ, T): the selection reads no private data.
* **ModelMix** (Xiao et al. 2022, :class:`ModelMix`): keep the previous iterate θₜ₋₁; push each
  coordinate pair apart to a gap of at least τ = lr · gap_rate; then take the SGD step from a
  per-coordinate random mix (1 − α)·θₜ₋₁ + α·θₜ with α ~ U[0, 1] (the gradient is still taken at θₜ).
  dpeq accounts for it as plain DP-SGD — the mix is post-processing of released iterates. The
  paper's much smaller ε (e.g. 8 where standard accounting gives far more) comes from a custom
  accountant with an extra per-coordinate sensitivity assumption, which dpeq does not adopt.

Both follow :class:`Variant`: :meth:`~Variant.begin_step` before the batch is drawn,
:meth:`~Variant.gradient_mask` before clipping and :meth:`~Variant.before_update` after the noise,
just before the optimiser's update; their state goes into a run's checkpoint.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn


class Variant(Protocol):
    """What the trainer calls, and when (:func:`dpeq_utils.train.train_step`)."""

    def begin_step(self, model: nn.Module) -> None:
        """Before the step's batch is drawn; may read the current (released) iterate, never data."""

    def gradient_mask(self, name: str) -> torch.Tensor | None:
        """The coordinates of parameter ``name`` whose per-example gradients count this step (None: all)."""

    def before_update(self, model: nn.Module) -> None:
        """After the noise (private) or the mean gradient (non-private), before the optimiser's update."""

    def summary(self, model: nn.Module) -> dict:
        """Result fields of the run record this variant decides (e.g. parameters kept)."""

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue (its random generator is saved by the trainer)."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (read onto the CPU), its tensors put on the device this variant's live on."""

SELECTION_METHODS = ("random", "magnitude")


def _keep_mask(values: torch.Tensor, keep: int, method: str, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask keeping ``keep`` entries of ``values``: the largest ``|values|`` or a uniform random set."""
    flat = values.detach().flatten()
    if method == "magnitude":
        # ties broken by a random permutation so equal magnitudes (e.g. zeros) are not kept by index order
        order = torch.randperm(flat.numel(), generator=generator, device=generator.device).to(flat.device)
        chosen = order[torch.topk(flat.abs()[order], keep, sorted=False).indices]
    elif method == "random":
        chosen = torch.randperm(flat.numel(), generator=generator, device=generator.device)[:keep].to(flat.device)
    else:
        raise ValueError(f"selection method must be one of {SELECTION_METHODS}, got {method!r}")
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[chosen] = True
    return mask.view_as(values)


def kept_count(size: int, rate: float) -> int:
    """Coordinates a tensor of ``size`` keeps at removal ``rate`` (at least one).

    >>> kept_count(10, 0.25), kept_count(3, 0.9), kept_count(4, 0.0)
    (8, 1, 4)
    """
    return max(1, round(size * (1 - rate)))


class CoordinateSelector:
    """Pre-pruning mask (fixed at construction, from the *initial* weights) and per-step dropping.

    ``generator`` supplies all randomness (a stream derived from the run seed). The selector only
    ever reads the model's parameters — the initial weights, then the current DP iterate — never data.
    """

    def __init__(self, model: nn.Module, prune_rate: float = 0.0, prune_method: str = "random",
                 drop_rate: float = 0.0, drop_method: str = "random", generator: torch.Generator | None = None):
        for name, rate in (("prune_rate", prune_rate), ("drop_rate", drop_rate)):
            if not 0 <= rate < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {rate}")
        self.drop_rate, self.drop_method = drop_rate, drop_method
        self.generator = generator if generator is not None else torch.Generator()
        self.prune_masks = {name: _keep_mask(p, kept_count(p.numel(), prune_rate), prune_method, self.generator)
                            for name, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():  # pruned weights are zero from the start and never move
            for name, p in model.named_parameters():
                if name in self.prune_masks:
                    p.mul_(self.prune_masks[name])
        self.mask = dict(self.prune_masks)
        self._index_kept()
        self.updated_fractions: list[float] = []

    def _index_kept(self) -> None:
        """The flat positions each pruning mask keeps, and how many: fixed for the whole run, so a step
        draws its dropping mask without reading a count back from the device."""
        self.kept = {name: mask.flatten().nonzero().squeeze(1) for name, mask in self.prune_masks.items()}
        self.kept_counts = {name: kept.numel() for name, kept in self.kept.items()}

    @property
    def kept_fraction(self) -> float:
        """Fraction of all coordinates that survive pruning."""
        total = sum(m.numel() for m in self.prune_masks.values())
        return sum(self.kept_counts.values()) / total

    def select(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Draw this step's mask: pruning mask ∧ (1 − drop_rate) of the kept coordinates."""
        if self.drop_rate == 0:
            self.mask = dict(self.prune_masks)
            updated = sum(self.kept_counts.values())
        else:
            params = dict(model.named_parameters())
            self.mask, updated = {}, 0
            for name, prune in self.prune_masks.items():
                kept, keep = self.kept[name], kept_count(self.kept_counts[name], self.drop_rate)
                chosen = _keep_mask(params[name].detach().flatten()[kept], keep, self.drop_method, self.generator)
                mask = torch.zeros(prune.numel(), dtype=torch.bool, device=prune.device)
                mask[kept[chosen]] = True
                self.mask[name] = mask.view_as(prune)
                updated += keep
        self.updated_fractions.append(updated / sum(m.numel() for m in self.mask.values()))
        return self.mask

    def begin_step(self, model: nn.Module) -> None:
        self.select(model)

    def gradient_mask(self, name: str) -> torch.Tensor | None:
        return self.mask.get(name)

    def summary(self, model: nn.Module) -> dict:
        total = sum(p.numel() for p in model.parameters())
        return {"kept_params": round(total * self.kept_fraction),
                "mean_updated_fraction": sum(self.updated_fractions) / max(1, len(self.updated_fractions))}

    def state_dict(self) -> dict:
        return {"prune_masks": self.prune_masks, "mask": self.mask, "updated_fractions": list(self.updated_fractions)}

    def load_state_dict(self, state: dict) -> None:
        device = next(iter(self.prune_masks.values())).device
        self.prune_masks = {name: mask.to(device) for name, mask in state["prune_masks"].items()}
        self.mask = {name: mask.to(device) for name, mask in state["mask"].items()}
        self._index_kept()
        self.updated_fractions = list(state["updated_fractions"])

    @torch.no_grad()
    def before_update(self, model: nn.Module) -> None:
        """Zero the noisy gradient outside this step's mask: noise lands only on updated coordinates."""
        for name, p in model.named_parameters():
            if name in self.mask and p.grad is not None:
                p.grad.mul_(self.mask[name])


class ModelMix:
    """Random per-coordinate mix of the current and previous iterate before each update (see module doc)."""

    def __init__(self, model: nn.Module, gap_rate: float, lr: float, generator: torch.Generator | None = None):
        if gap_rate < 0:
            raise ValueError(f"modelmix_gap_rate must be >= 0, got {gap_rate}")
        self.tau = lr * gap_rate
        self.generator = generator if generator is not None else torch.Generator()
        self.previous = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    def begin_step(self, model: nn.Module) -> None:
        pass

    def gradient_mask(self, name: str) -> None:
        return None

    def summary(self, model: nn.Module) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"previous": self.previous}

    def load_state_dict(self, state: dict) -> None:
        self.previous = {name: value.to(self.previous[name].device, copy=True) for name, value in state["previous"].items()}

    @torch.no_grad()
    def mix(self, current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """The gap-enforced pair, mixed: every coordinate of the result lies between the pushed-apart
        iterates, which are at least τ apart (equal coordinates are pushed apart in the + direction)."""
        difference = current - previous
        direction = torch.where(difference >= 0, 1.0, -1.0).to(current.dtype)
        push = (self.tau - difference.abs()).clamp_min(0) / 2
        current, previous = current + push * direction, previous - push * direction
        alpha = torch.rand(current.shape, generator=self.generator, device=self.generator.device,
                           dtype=current.dtype).to(current.device)
        return alpha * current + (1 - alpha) * previous

    @torch.no_grad()
    def before_update(self, model: nn.Module) -> None:
        """θₜ₋₁ ← θₜ and θₜ ← mix(θₜ, θₜ₋₁); the optimiser then steps from the mix with the gradient at θₜ."""
        for name, p in model.named_parameters():
            if name not in self.previous:
                continue
            current = p.detach().clone()
            p.copy_(self.mix(current, self.previous[name]))
            self.previous[name] = current


def build_variants(config, model: nn.Module, generator: torch.Generator) -> list[Variant]:
    """The variant objects a run config asks for (empty for plain DP-SGD)."""
    variants = []
    if config.prune_rate > 0 or config.drop_rate > 0:
        variants.append(CoordinateSelector(model, config.prune_rate, config.prune_method, config.drop_rate,
                                           config.drop_method, generator))
    if config.modelmix:
        variants.append(ModelMix(model, config.modelmix_gap_rate, config.lr, generator))
    return variants
