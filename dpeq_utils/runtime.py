"""Seeds, devices and a report of the environment a run happened in."""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import os
import platform
import random
import time
from importlib import metadata

import numpy as np
import torch

from .provenance import CODE

#: Libraries whose versions every run record carries.
TRACKED_LIBRARIES = ("torch", "escnn", "opacus", "numpy", "dpeq")


def derived_seeds(entropy, count: int) -> list[int]:
    """``count`` independent 63-bit seeds derived from ``entropy`` (an int or a list of ints) by
    NumPy's ``SeedSequence``: every random stream dpeq draws from (sampler, augmentation, noise,
    variants, synthetic splits) gets its own. Asking for more never changes the first ones.

    >>> derived_seeds(0, 3)[:2] == derived_seeds(0, 2)
    True
    """
    return [int(s) >> 1 for s in np.random.SeedSequence(entropy).generate_state(count, np.uint64)]


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


def configure_device(device: torch.device, allow_tf32: bool = False, deterministic: bool = False) -> None:
    """Set a GPU's precision and determinism for a run, explicitly (nothing on a CPU, whose kernels
    compute in float32 and repeat bit for bit on the same kind of CPU).

    ``allow_tf32`` sets both of PyTorch's TF32 switches (matrix products and cuDNN convolutions; its
    defaults differ: off and on). ``deterministic`` turns on ``torch.use_deterministic_algorithms`` (with
    ``warn_only``: an operation without a deterministic CUDA kernel warns, naming itself, instead of
    stopping the run — the run is then not guaranteed to repeat), cuDNN's deterministic kernels, and
    sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` if unset (cuBLAS reads it when PyTorch first uses it: set
    it in the environment before starting Python to be sure). The record's ``machine`` names the
    settings in force (:mod:`dpeq_utils.machine`)."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return str(device)
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
    """The checkout's commit (with ``+dirty`` when it had uncommitted changes), or None outside git,
    as it was when ``dpeq_utils`` was imported: the code this process runs
    (:mod:`dpeq_utils.provenance`)."""
    return CODE["git_commit"]


def environment_report(device: str | torch.device = "auto") -> dict[str, str]:
    """What a notebook's set-up cell prints: versions, device, commit."""
    chosen = device if isinstance(device, torch.device) else pick_device(device)
    return {**library_versions(), "device": device_name(chosen), "git_commit": git_commit() or "unknown"}


def tune_cpu_allocator() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS.

    DP-SGD on a CPU allocates and frees tensors of hundreds of MB every step (per-example
    gradients, unfolded inputs). By default glibc serves each from a fresh ``mmap`` and unmaps it on
    free, so every step pays the page faults of touching that memory anew (millions per teach run,
    measured). Raising ``M_MMAP_THRESHOLD`` keeps such blocks in the heap, and ``M_TRIM_THRESHOLD`` = -1
    (mallopt(3): "disables trimming completely") keeps the heap from shrinking: with the trim
    threshold at 2**31 - 1, as before, a ``free`` that left more than 2 GB free at the top of the heap
    gave it back to the OS (glibc's ``systrim``, caught in gdb in WRN-16-4's per-example gradients at
    batch 256: 2.9 GB at once) and the next step faulted it in again: 520,000-740,000 page faults and
    2-3 s more per step on a 2-core AMD EPYC (family 25), 0 after the change.
    Measured on 2 cores before either setting: the paper model at batch 256 went from 89 to 110
    examples/s non-private and from 53 to 72 with per-example gradients. The cost: the process keeps
    its peak memory until it exits (the trainer calls :func:`release_free_memory` after a run). The
    heap still grows during the first steps until freed blocks fit the next requests; the benchmark
    warms up until it stops and reports the faults (``dpeq_utils.benchmark._warm_up``).
    Set ``DPEQ_MALLOC_TUNING=0`` to opt out. Returns whether the setting was applied (glibc only).
    """
    libc = _glibc()
    if os.environ.get("DPEQ_MALLOC_TUNING", "1") == "0" or libc is None:
        return False
    m_trim_threshold, m_mmap_threshold, largest_int, never = -1, -3, 2 ** 31 - 1, -1
    return bool(libc.mallopt(m_mmap_threshold, largest_int)) and bool(libc.mallopt(m_trim_threshold, never))


def release_free_memory(device: torch.device | None = None) -> None:
    """After a run: hand the allocator's cached free memory back — to the OS on a CPU (glibc
    ``malloc_trim``), to the GPU on CUDA (the caching allocator's unused blocks), so that the next run
    of a long process (a study, a sweep in one process) starts lean."""
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()
        return
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def to_device(value, device: torch.device):
    """``value`` (tensors inside dicts, lists and tuples) with every tensor on ``device`` (a tensor already
    there is returned as it is, not copied)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    return value


def to_device_async(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without blocking the host: on CUDA pinned, then copied asynchronously
    (the caching host allocator keeps the pinned copy alive until the transfer is done); on the CPU
    the tensor itself."""
    if device.type == "cpu" or tensor.device == device:
        return tensor
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


# ---------------------------------------------------------------------------------------------- phase clock


def synchronize(device: torch.device | None) -> None:
    """Wait for the work queued on ``device`` (a GPU's queue; nothing to wait for on a CPU)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimes:
    """Seconds per phase of a training step, summed over calls (the benchmark's breakdown)."""

    def __init__(self, device: torch.device | None = None):
        self.seconds: dict[str, float] = {}
        # on a GPU every phase boundary synchronises, so phases are measured one after the other
        self.device = device

    def sync(self) -> None:
        synchronize(self.device)


_PHASE_TIMES: contextvars.ContextVar[PhaseTimes | None] = contextvars.ContextVar("dpeq_phase_times", default=None)


@contextlib.contextmanager
def measure_phases(device: torch.device | None = None):
    """Collect the seconds spent in each :func:`phase` of the code run inside; yields the
    :class:`PhaseTimes`. Outside it, :func:`phase` costs nothing."""
    times = PhaseTimes(device)
    token = _PHASE_TIMES.set(times)
    try:
        yield times
    finally:
        _PHASE_TIMES.reset(token)


@contextlib.contextmanager
def phase(name: str):
    """Count the time spent inside towards ``name`` while :func:`measure_phases` is active."""
    times = _PHASE_TIMES.get()
    if times is None:
        yield
        return
    times.sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        times.sync()
        times.seconds[name] = times.seconds.get(name, 0.0) + time.perf_counter() - start


def conv_layout(images: torch.Tensor) -> torch.Tensor:
    """A batch of images ``(N, C, H, W)`` in the memory layout convolutions are fastest with here:
    channels-last on a CPU (oneDNN's native layout; NCHW input is reordered inside every
    convolution), unchanged elsewhere. Measured on a 2-core AMD EPYC (AVX-512), batch 256: the paper
    model's forward 0.93 → 0.70 s, its non-private step 2.3 → 2.0 s. Same values, other strides."""
    return images.contiguous(memory_format=torch.channels_last) if images.device.type == "cpu" else images
