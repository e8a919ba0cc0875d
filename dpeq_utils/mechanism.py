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

import hashlib
import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path

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


def clipped_signal(flat: torch.Tensor, clip_norm: float) -> dict[str, float]:
    """Clip each row of ``flat`` (one per-example gradient per row, n ≥ 2) to norm ``clip_norm`` and
    measure what their average keeps: the fraction clipped, the median norm before clipping, the mean
    pairwise cosine and the unbiased length of the mean (both from one Gram matrix). When every row is
    clipped, ``signal_norm`` is C·√(mean cosine): at a fixed clip norm the signal is set by how well
    the examples' gradients agree, whatever their number of coordinates."""
    if len(flat) < 2:
        raise ValueError("the signal estimate needs at least two examples")
    norms = flat.norm(dim=1)
    clipped = flat * (clip_norm / (norms + 1e-6)).clamp(max=1.0).unsqueeze(1)
    gram = _gram(clipped)
    n = len(clipped)
    lengths = gram.diagonal().sqrt()
    cosines = gram / (lengths[:, None] * lengths[None, :]).clamp(min=1e-300)
    mean_cosine = (cosines.sum() - cosines.diagonal().sum()) / (n * (n - 1))
    return {"examples": n, "median gradient norm": float(norms.median()),
            "clipped": float((norms > clip_norm).float().mean()), "signal_norm": _length_from_gram(gram),
            "mean_cosine": float(mean_cosine)}


def signal_and_noise(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, clip_norm: float,
                     noise_multiplier: float, batch_size: int, engine: str = "auto") -> dict[str, float]:
    """Measure the clipped signal of ``images`` (one view each) under ``model`` against one step's
    noise at (σ = ``noise_multiplier``, C = ``clip_norm``, expected batch ``batch_size``)."""
    if len(images) < 2:
        raise ValueError("the signal estimate needs at least two examples")
    grads, _ = per_sample_grads(model, images.unsqueeze(1), labels, engine)
    flat = torch.cat([g.detach().flatten(1) for g in grads.values()], 1)
    measured = clipped_signal(flat, clip_norm)
    d = flat.shape[1]
    signal = measured["signal_norm"]
    noise = noise_multiplier * clip_norm * math.sqrt(d) / batch_size
    return {"parameters": d, "examples": measured["examples"], "median gradient norm": measured["median gradient norm"],
            "clipped": measured["clipped"], "signal_norm": signal, "mean_cosine": measured["mean_cosine"],
            "noise_norm": noise, "noise_to_signal": noise / signal if signal > 0 else math.inf,
            "noise_to_max_signal": noise / clip_norm}


# ------------------------------------------------------------------------------------ along training

#: Format of a record of :func:`measure_along_training` (``<runs dir>/mechanism/<model>-<key>.json``).
MECHANISM_SCHEMA = "dpeq-mechanism-1"
#: The measures averaged over a point's probes (each probe: disjoint training examples); its
#: noise-to-signal ratio is the noise over the averaged signal.
POINT_MEASURES = ("median gradient norm", "clipped", "signal_norm", "mean_cosine", "noise_norm")


def along_training_key(config, at_steps, probes: int, probe_size: int) -> str:
    """What decides the measurement: the run (its config key), where along it, and the probes."""
    from .records import config_key

    values = {"config": config_key(config), "at_steps": sorted(int(s) for s in at_steps), "probes": probes,
              "probe_size": probe_size}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def along_training_path(config, at_steps, probes: int = 4, probe_size: int = 64, runs_dir=None) -> Path:
    """``<runs dir>/mechanism/<model>-<key>.json`` (runs dir: the profile's by default)."""
    from .paths import runs_dir as default_runs_dir

    folder = Path(runs_dir) if runs_dir is not None else default_runs_dir(config.profile)
    return folder / "mechanism" / f"{config.model}-{along_training_key(config, at_steps, probes, probe_size)}.json"


def measure_along_training(config, at_steps, probes: int = 4, probe_size: int = 64, data=None,
                           progress: bool = False) -> dict:
    """Train the DP run ``config`` with the trainer's own steps and, at each of ``at_steps``, measure
    :func:`signal_and_noise` of its raw weights (the weights DP-SGD clips gradients at) on ``probes``
    disjoint sets of ``probe_size`` training examples, against the run's own noise (its σ, clip and
    expected batch). The measuring works on a copy of the model with the global generators restored
    afterwards, so the run trains exactly as it would without it; its final test accuracy (raw and
    EMA) is stored to show that. Returns the body of a mechanism record."""
    from tqdm import tqdm

    from .run_state import global_generator_states, set_global_generator_states, swapped_parameters
    from .train import build_model_for, evaluate, setup, train_step

    if config.non_private:
        raise ValueError("the mechanism is measured on a DP run: its noise is what the signal is compared with")
    at_steps = sorted({int(s) for s in at_steps})
    state = setup(config, data)
    if not at_steps or at_steps[0] < 0 or at_steps[-1] > state.steps:
        raise ValueError(f"at_steps must lie between 0 and the run's {state.steps} steps, got {at_steps}")
    train_data = state.splits.train
    if probes * probe_size > len(train_data):
        raise ValueError(f"{probes} probes of {probe_size} examples need {probes * probe_size} training examples; "
                         f"the run has {len(train_data)}")
    chosen = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(config.seed + 7919))
    probe_sets = chosen[:probes * probe_size].view(probes, probe_size)
    sigma = state.budget.noise_multiplier
    points = []
    saved = global_generator_states(state.device)
    copy = build_model_for(config).to(state.device).train()  # what is measured: the run's weights, loaded into it
    set_global_generator_states(saved, state.device)
    placed = train_data.on(state.device)
    bar = tqdm(total=at_steps[-1], disable=not progress, leave=False, desc=f"{config.model} along training")
    for target in at_steps:
        while state.step < target:
            train_step(state)
            bar.update()
        saved = global_generator_states(state.device)
        copy.load_state_dict(state.model.state_dict())
        measured = [signal_and_noise(copy, placed.normalized(index), placed.labels[index], config.clip_norm, sigma,
                                     config.batch_size) for index in probe_sets.to(state.device)]
        set_global_generator_states(saved, state.device)
        point = {m: float(sum(x[m] for x in measured) / probes) for m in POINT_MEASURES}
        # the noise against the mean signal (not the mean of per-probe ratios, which one short probe inflates)
        point["noise_to_signal"] = point["noise_norm"] / point["signal_norm"] if point["signal_norm"] > 0 else math.inf
        points.append({"step": state.step, "epsilon": state.budget.epsilon() if state.step else 0.0, **point,
                       "noise_to_signal_probes": [x["noise_to_signal"] for x in measured],
                       "signal_norm_probes": [x["signal_norm"] for x in measured]})
    bar.close()
    accuracy, _ = evaluate(state.model, state.splits.test, state.device)
    with swapped_parameters(state.model, state.ema.values):
        accuracy_ema, _ = evaluate(state.model, state.splits.test, state.device)
    return {"noise_multiplier": sigma, "batch_size": config.batch_size, "clip_norm": config.clip_norm,
            "parameters": measured[0]["parameters"], "points": points, "steps_trained": state.step,
            "test_accuracy": accuracy, "test_accuracy_ema": accuracy_ema}


def find_along_training(config, at_steps, probes: int = 4, probe_size: int = 64, runs_dir=None) -> dict | None:
    """The mechanism record of ``config`` at ``at_steps``, verified, or None: the shipped one
    (``data/reference/<profile>/mechanism/``) first, then the user's (checked as run records are: a
    shipped one against the manifest, any one against its digest and key)."""
    from .records import find_file, read_keyed_record

    path = along_training_path(config, at_steps, probes, probe_size, runs_dir)
    found = find_file(Path("mechanism") / path.name, config.profile, runs_dir)
    if found is None:
        return None
    return read_keyed_record(found, MECHANISM_SCHEMA, along_training_key(config, at_steps, probes, probe_size),
                             "a mechanism record of this run", "delete it", require_digest=True)


def measure_and_write_along_training(config, at_steps, probes: int = 4, probe_size: int = 64, runs_dir=None,
                                     write_reference: bool = False, progress: bool = False) -> dict:
    """:func:`measure_along_training` (it trains the run: as long as the run itself), written as a
    mechanism record to the user's folder (a reference folder only with ``write_reference``)."""
    from .machine import machine_kind
    from .provenance import CODE
    from .records import config_key, write_record
    from .runtime import device_name, library_versions, pick_device
    from .shipped import guard_write

    path = along_training_path(config, at_steps, probes, probe_size, runs_dir)
    guard_write(path.parent, write_reference)
    started = time.perf_counter()
    body = measure_along_training(config, at_steps, probes, probe_size, progress=progress)
    record = {"schema": MECHANISM_SCHEMA, "key": along_training_key(config, at_steps, probes, probe_size),
              "run_key": config_key(config), "config": config.to_dict(),
              "probes": probes, "probe_size": probe_size, **body, "wall_time_s": time.perf_counter() - started,
              "device": device_name(pick_device(config.device)),
              "machine": machine_kind(pick_device(config.device)), "versions": library_versions(),
              "git_commit": CODE["git_commit"], "source_sha256": CODE["source_sha256"],
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return {**write_record(path, record), "source": str(path)}


def load_or_measure_along_training(config, at_steps, probes: int = 4, probe_size: int = 64, runs_dir=None,
                                   train_missing: bool = True, write_reference: bool = False,
                                   progress: bool = False) -> dict | None:
    """:func:`find_along_training`, else (if ``train_missing``) :func:`measure_and_write_along_training`,
    else None."""
    found = find_along_training(config, at_steps, probes, probe_size, runs_dir)
    if found is not None or not train_missing:
        return found
    return measure_and_write_along_training(config, at_steps, probes, probe_size, runs_dir, write_reference, progress)
