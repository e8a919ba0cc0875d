"""Checks made before a run does any work: can its record be written, will it fit in memory.

A run that cannot write its record, or that will exhaust the machine's memory, should say so before
its first step, not after hours of training.

Memory is estimated from measurements, not derived from first principles.

- **On a CPU** the benchmark (``benchmarks/per_sample_speed.py``, 2-core CPU, paper widths) measured
  the peak memory of one DP step and one non-private step at physical batches 64 and 256; the slope
  per example is what a larger batch costs. Other widths and groups are scaled by their activation
  size per example (counted with one forward pass of one example), which is what the cost follows.
- **On a GPU** the run's own model is measured on the device before the first step: the peak memory
  of the step's per-example gradients (or, non-private, its forward and backward) on chunks of one
  and two examples of blank images (no data is read, no parameter changes), extrapolated linearly to
  ``physical_batch_size`` examples, plus the data placed on the device, the parameters, EMAs and
  optimiser state; refused when above the device's free memory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .errors import DpeqError

#: MB per example-view of one step (DP step, non-private step) at the default widths: the benchmark's
#: (peak at batch 256 - peak at batch 64) / 192 for eq_resnet9, resnet9 and wrn16_4 (README, *Speed*);
#: resnet9_matched scaled from resnet9 by activation size.
MB_PER_EXAMPLE_VIEW = {"eq_resnet9": (11.5, 5.3), "resnet9": (9.8, 5.5), "resnet9_matched": (4.1, 2.3),
                       "wrn16_4": (21.3, 7.5)}
#: Activation elements per example of those models at the default widths (the benchmark's models).
REFERENCE_ACTIVATIONS = {"eq_resnet9": 335_826, "resnet9": 636_618, "resnet9_matched": 268_714, "wrn16_4": 1_064_970}
#: The interpreter, torch, escnn and the allocator's slack: the smallest run's peak (smoke, measured ~0.9 GB).
BASE_MB = 1000
#: Examples per evaluation forward pass (``train.evaluate``).
EVAL_BATCH = 500
#: The allocator keeps freed blocks for reuse (``runtime.tune_cpu_allocator``) and fragments, so the
#: process's peak is about twice the working set measured per step: with it, the estimate for the
#: single teach run is 4.0 GB, its measured peak (README, *Profiles*).
SLACK = 2.0
#: Free disk a run needs for its record (and a margin).
MIN_FREE_DISK_MB = 50


#: Peak memory of *building* a model per MB of its dense 3×3 filters (every conv's out × in × 9
#: float32, computed from the widths: nothing is built to know it). escnn samples its steerable basis
#: for every pair of fields: eq_resnet9 under D4 peaked at 9.3× (widths 128: 401 MB; 256: 1.58 GB, 59 s);
#: resnet9_matched builds the equivariant model to count its parameters; a plain conv holds its filter once.
BUILD_MB_PER_FILTER_MB = {"eq_resnet9": 10.0, "resnet9_matched": 10.0, "resnet9": 1.5, "wrn16_4": 1.5}



class PreflightError(DpeqError, RuntimeError):
    """A run would fail or harm the machine; the message says what to change."""


def check_output_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and prove it is writable and has room for a record."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dpeq-write-check.", delete=True):
            pass
    except OSError as err:
        raise PreflightError(f"cannot write run records to {folder} ({err.strerror or err}): choose another folder "
                             "with --runs-dir (or DPEQ_RUNS_DIR), or fix its permissions; nothing was trained") from err
    free_mb = shutil.disk_usage(folder).free / 2 ** 20
    if free_mb < MIN_FREE_DISK_MB:
        raise PreflightError(f"only {free_mb:.0f} MB free where run records go ({folder}); free at least "
                             f"{MIN_FREE_DISK_MB} MB or choose another folder; nothing was trained")
    return folder


def available_memory_mb() -> float | None:
    """Memory this process may still use: ``DPEQ_MEMORY_LIMIT_MB`` if set, else the kernel's
    MemAvailable (Linux), else None (unknown: no check)."""
    limit = os.environ.get("DPEQ_MEMORY_LIMIT_MB")
    if limit:
        return float(limit)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def activations_per_example(model: nn.Module, image_shape=(3, 32, 32)) -> int:
    """Output elements of every leaf module for one example (one no-grad forward pass)."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        output = getattr(output, "tensor", output)
        if isinstance(output, torch.Tensor):
            total += output[0].numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, *image_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return total


def estimate_memory_mb(config, model: nn.Module, data_examples: int) -> float:
    """Estimated peak memory (MB) of a run on a CPU: base + data + (one physical chunk's step + one
    evaluation pass) × :data:`SLACK`."""
    private_mb, plain_mb = MB_PER_EXAMPLE_VIEW[config.model]
    per_view = plain_mb if config.non_private else private_mb
    activations = activations_per_example(model)
    step = config.physical_batch_size * config.aug_mult * per_view * activations / REFERENCE_ACTIVATIONS[config.model]
    evaluation = EVAL_BATCH * activations * 4 / 2 ** 20
    return BASE_MB + data_examples * 3 * 32 * 32 / 2 ** 20 + SLACK * (step + evaluation)


def dense_filter_mb(config) -> float:
    """MB of ``config``'s model's dense 3×3 filters, from its widths alone (a slight overestimate for
    the parameter-matched ResNet-9, whose build is dominated by the equivariant model it counts)."""
    from .models import same_width_channels

    if config.model == "wrn16_4":  # De et al.'s WRN-16-4 scaled by the widths: a stem, then 3 stages of 2 blocks
        b0, b1, b2 = config.widths
        stages = [(b0, 4 * b0), (4 * b0, 4 * b1), (4 * b1, 4 * b2)]
        pairs = [(3, b0)] + [p for i, o in stages for p in ((i, o), (o, o), (o, o), (o, o))]
    else:  # the ResNet-9 topology at the equivariant model's channels (fields × field size)
        c0, c1, c3, c2 = same_width_channels(config.group, config.restrict, config.widths)
        pairs = [(3, c0), (c0, c1), (c1, c1), (c1, c1), (c1, c3), (c3, c2), (c2, c2), (c2, c2)]
    return 9 * 4 * sum(i * o for i, o in pairs) / 2 ** 20


def check_build_memory(config, force: bool = False) -> float:
    """Before the model is built: refuse (unless ``force``) a model whose construction alone
    (:data:`BUILD_MB_PER_FILTER_MB`) would not fit in the available memory, with one sentence instead
    of a ``MemoryError`` gigabytes into escnn; the rest of the run is :func:`check_memory`'s, once the
    model is built. Returns the estimate (MB)."""
    estimate = BUILD_MB_PER_FILTER_MB.get(config.model, 10.0) * dense_filter_mb(config)  # the build's own
    available = available_memory_mb()
    if available is not None and estimate > available and not force:
        raise PreflightError(f"building {config.model} at widths {list(config.widths)} (group {config.group}) needs about "
                             f"{estimate / 1024:.1f} GB of memory before training starts (its filters grow with the "
                             f"square of the widths), {available / 1024:.1f} GB is available: lower the widths (the "
                             "paper: 16, 32, 64), or force it (--force-memory) if you know better; nothing was built")
    return estimate


def check_memory(config, model: nn.Module, splits, device: torch.device | None = None, force: bool = False) -> float:
    """Warn when the run's estimated peak memory is above 80 % of what is available, refuse above 100 %
    unless ``force``: host RAM on a CPU, the device's free memory on a GPU (where the model is measured,
    see the module docstring). ``splits``: the run's datasets (or their total number of examples).
    Returns the estimate (MB)."""
    device = torch.device("cpu") if device is None else device
    examples = splits if isinstance(splits, int) else sum(len(part) for part in splits if part is not None)
    if device.type == "cpu":
        estimate, available, where = estimate_memory_mb(config, model, examples), available_memory_mb(), ""
    else:
        free = device_free_mb(device)
        if free is None:  # a device without memory statistics: nothing to check against
            return float("nan")
        estimate, available, where = estimate_device_memory_mb(config, model, examples, device), free, " on the GPU"
    if available is None:
        return estimate
    advice = (f"lower physical_batch_size (now {config.physical_batch_size}; it changes memory, not the result)"
              + (f" or aug_mult (now {config.aug_mult})" if config.aug_mult > 1 else ""))
    if estimate > available and not force:
        raise PreflightError(f"this run needs about {estimate / 1024:.1f} GB of memory{where}, {available / 1024:.1f} GB "
                             f"is available: {advice}, or force it (--force-memory) if you know better; nothing was trained")
    if estimate > 0.8 * available:
        warnings.warn(f"this run needs about {estimate / 1024:.1f} GB of memory{where}, close to the "
                      f"{available / 1024:.1f} GB available; if it fails, {advice}", ResourceWarning, stacklevel=2)
    return estimate


def device_free_mb(device: torch.device) -> float | None:
    """Free memory on a GPU (``torch.cuda.mem_get_info``), None on devices that do not report it."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free / 2 ** 20


def measured_chunk_mb(config, model: nn.Module, examples: int, device: torch.device) -> float:
    """Peak device memory (MB) of one chunk of ``examples`` blank examples with the run's views: its
    per-example gradients (private) or its forward and backward (non-private), above what was
    allocated before. Reads no data and leaves the parameters as they were (no gradient stays)."""
    from .dp_step import _accumulate_plain_gradient
    from .per_sample import per_sample_grads

    views = torch.zeros(examples, config.aug_mult, 3, 32, 32, device=device)
    labels = torch.zeros(examples, dtype=torch.long, device=device)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    if config.non_private:
        _accumulate_plain_gradient(model, views, labels, examples)
        model.zero_grad(set_to_none=True)
    else:
        grads, _ = per_sample_grads(model, views, labels, config.per_sample_engine)
        del grads
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def estimate_device_memory_mb(config, model: nn.Module, data_examples: int, device: torch.device) -> float:
    """Estimated peak device memory (MB) of a run on a GPU: one chunk of ``physical_batch_size``
    examples extrapolated from measured chunks of one and two (:func:`measured_chunk_mb`), × a 20 %
    margin for the clipping's temporaries and the allocator's fragmentation, plus the data placed on
    the device (uint8) and the parameters, EMAs and optimiser state (float32)."""
    one, two = (measured_chunk_mb(config, model, n, device) for n in (1, 2))
    chunk = one + (two - one) * (config.physical_batch_size - 1)
    parameters = sum(p.numel() for p in model.parameters()) * 4 / 2 ** 20
    copies = 3 + len(config.ema_horizons) + (1 if config.momentum else 0)  # weights, summed gradient, EMA(s), momentum
    return 1.2 * chunk + data_examples * 3 * 32 * 32 / 2 ** 20 + copies * parameters
