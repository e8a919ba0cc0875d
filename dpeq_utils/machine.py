"""The machine a run or a speed figure came from, read from the machine itself: CPU model, clock,
caches, vector units, torch's CPU capability and threads; on CUDA the GPU, its libraries and the
precision and determinism settings in force.

Every run record carries it (``machine``): CPU kernels round differently across vector units
(oneDNN and MKL pick their kernels by the ISA: AVX2, AVX-512, AMX), so a run repeats bit for bit
only on the same kind of CPU with the same code; the benchmark's figures carry it because speed
depends on all of it.
"""

from __future__ import annotations

import os
import platform

import torch

#: CPU features that decide which kernels oneDNN/MKL use for convolutions and matmuls.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


#: Where :func:`machine_description` reads the CPU (module-level so a test can point them elsewhere).
CPUINFO = "/proc/cpuinfo"
CPU_CACHES = "/sys/devices/system/cpu/cpu0/cache"


def _cache_sizes() -> dict[int, str]:
    """The first CPU's data (or unified) cache size per level as the kernel names it, e.g. ``{1: "32K",
    2: "512K", 3: "32768K"}``; empty where sysfs does not say."""
    sizes: dict[int, str] = {}
    try:
        for index in sorted(os.listdir(CPU_CACHES)):
            if not index.startswith("index"):
                continue
            path = os.path.join(CPU_CACHES, index)
            with open(os.path.join(path, "type")) as kind, open(os.path.join(path, "level")) as level, \
                    open(os.path.join(path, "size")) as size:
                if kind.read().strip() != "Instruction":
                    sizes[int(level.read())] = size.read().strip()
    except (OSError, ValueError):
        return {}
    return sizes


def machine_description(device: torch.device | None = None) -> dict[str, str]:
    """What a speed figure depends on: CPU model, cores, clock, caches, the ISA extensions that matter,
    torch's CPU capability (the vector kernels it dispatched to) and threads; the GPU when ``device`` is
    one. Clock and caches are there because the CPU model is not enough: two virtual machines of this
    project that both reported ``AMD EPYC (family 25, model 1)`` ran the paper model's non-private
    step at 64-68 and 86-116 examples/s (the same engine, each machine idle)."""
    model, info = platform.processor() or platform.machine(), {}
    try:
        with open(CPUINFO) as handle:
            for line in handle:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())  # the first processor's entry
    except OSError:  # not Linux: model from platform, flags unknown
        pass
    if "model name" in info:
        model = info["model name"]
        if "cpu family" in info:  # virtual machines often show a bare "AMD EPYC": the family tells generations apart
            model += f" (family {info['cpu family']}, model {info.get('model', '?')}, stepping {info.get('stepping', '?')})"
    flags = set(info.get("flags", "").split())
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    description = {
        "cpu": model + (" in a virtual machine" if "hypervisor" in flags else ""),
        "cores": f"{usable} usable of {os.cpu_count()}",
    }
    if "cpu MHz" in info:  # in a virtual machine, usually the host's nominal clock, not the current one
        description["clock"] = f"{float(info['cpu MHz']):.0f} MHz as reported"
    sizes = _cache_sizes()
    if sizes:
        description["caches"] = ", ".join(f"L{level} {size}" for level, size in sorted(sizes.items()))
    elif "cache size" in info:  # what it counts differs by vendor (L2 per core on AMD, L3 on Intel)
        description["caches"] = f"{info['cache size']} (/proc/cpuinfo's cache size)"
    description.update({
        "isa": " ".join(f for f in ISA_FLAGS if f in flags) or "unknown",
        "torch cpu capability": torch.backends.cpu.get_cpu_capability(),
        "torch threads": str(torch.get_num_threads()),
        "torch": str(torch.__version__),  # a TorchVersion, which torch.load(weights_only=True) refuses
    })
    if device is not None and device.type == "cuda":
        description.update(gpu_description(device))
    return description


def gpu_description(device: torch.device) -> dict[str, str]:
    """The GPU and what decides its rounding: capability, CUDA and cuDNN versions, whether TF32 is
    allowed for matmuls and convolutions (on Ampere and later it rounds their inputs to 10 mantissa
    bits), and whether deterministic algorithms are enforced."""
    major, minor = torch.cuda.get_device_capability(device)
    return {
        "gpu": torch.cuda.get_device_name(device),
        "gpu capability": f"{major}.{minor}",
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()),
        "tf32 matmul": str(torch.backends.cuda.matmul.allow_tf32),
        "tf32 cudnn": str(torch.backends.cudnn.allow_tf32),
        "deterministic algorithms": str(torch.are_deterministic_algorithms_enabled()),
    }


def machine_kind(device: torch.device | None = None) -> dict[str, str]:
    """:func:`machine_description` without the clock (on bare metal ``cpu MHz`` changes from one read
    to the next): what a run record names, and what must match for two runs to round alike."""
    return {key: value for key, value in machine_description(device).items() if key != "clock"}
