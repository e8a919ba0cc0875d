"""Throughput of one training step: non-private, each per-example gradient engine, the whole DP step.

Used by ``benchmarks/per_sample_speed.py`` (the README's speed tables). Every figure comes from one
process, as the median of ``repeats`` timed calls of one kind in a row, after untimed warm-up calls
that stop once a call no longer makes the process touch new memory (:func:`_warm_up`): a training run
repeats one kind of step thousands of times, and what it pays per step is that steady state. The
kinds are measured one after the other, the memory-hungry ``vmap`` reference last:

* ``non_private`` — the trainer's non-private step: forward + backward of the mean loss and the SGD
  update (the floor a DP step is compared with);
* ``<engine>`` — per-example gradients by that engine alone (:mod:`dpeq_utils.per_sample`);
* ``dp_step`` — what the trainer does per physical batch: per-example gradients (``auto`` engine),
  clipping, noise, SGD update (Opacus ``DPOptimizer``, as :func:`dpeq_utils.dp_step.logical_step`).

Throughput counts *examples* per second; with ``views > 1`` each example carries that many
augmentation views (the work per example grows accordingly). On a CPU the allocator is tuned first,
as the trainer does (:func:`dpeq_utils.runtime.tune_cpu_allocator`), and every figure carries the
minor page faults per timed call (0 in a steady state). Peak memory is CUDA's peak allocation
on a GPU and, on a CPU, the peak resident set size above the level before the call (sampled
every 2 ms by a thread, so short spikes can be missed), each from one extra untimed call; on a CPU
glibc's ``malloc_trim`` first hands cached free memory back, otherwise earlier calls would hide it.

The DP step's time over the non-private one comes twice: from the two kinds' medians, and from
``pairs`` rounds in which the two steps run back to back (:func:`_alternating_ratios`). A CPU of a
shared machine drifts in speed over minutes; timed minutes apart the two medians carry that drift
into the ratio (the paper model's ratio read 1.34× and 1.26× in two runs of one commit on a 2-core
AMD EPYC, family 25 model 1), while a pair's two calls share it. The run starts and ends with the
machine's speed on a few reference kernels (:func:`reference_speeds`), which says what kind of machine
it was and whether its speed moved during the run.

Why one file of ~470 lines: the timing protocol (warm-up, medians, memory, paired ratios) is
shared by every figure it makes; keeping it with them keeps every figure measured the same way.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import escnn.nn as enn
import torch
import torch.nn as nn
from opacus.optimizers import DPOptimizer

from ..dp_step import logical_step
from ..models import build_model, count_params
from ..per_sample import ENGINE_FUNCTIONS
from ..runtime import (
    device_name,
    measure_phases,
    pick_device,
    release_free_memory,
    synchronize,
    tune_cpu_allocator,
)

try:
    import resource
except ImportError:  # not POSIX: page faults unknown
    resource = None  # type: ignore[assignment]

# name → (model, build_model keyword arguments): the models the README's speed table compares
BENCHMARK_MODELS = {
    "eq_resnet9": ("eq_resnet9", {}),  # the paper's D4→D2 equivariant ResNet-9
    "eq_resnet9_small": ("eq_resnet9", {"widths": (8, 16, 32)}),
    "resnet9": ("resnet9", {}),  # same tensor widths as eq_resnet9, unconstrained convs
    "wrn16_4": ("wrn16_4", {}),  # De et al. 2022
}


@dataclass
class Measurement:
    model: str
    params: int
    batch: int
    views: int
    kind: str  # non_private, hooks, vmap, dp_step
    examples_per_s: float
    seconds: float  # median seconds per call
    peak_mb: float
    device: str
    page_faults: float = 0.0  # minor page faults per timed call: new memory touched (0 when steady)
    # dp_step only: DP step / non-private step from back-to-back pairs (median, lowest, highest); NaN if not run
    paired_ratio: float = float("nan")
    paired_low: float = float("nan")
    paired_high: float = float("nan")


class _PeakRSS:
    """Peak resident memory (MB) above the starting level, sampled by a background thread (Linux)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self):
        release_free_memory()
        self.start = self.peak = self._rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def megabytes(self) -> float:
        return (self.peak - self.start) / 2 ** 20


def _minor_faults() -> int:
    """Minor page faults of this process so far (memory touched for the first time); 0 where unknown."""
    return 0 if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


#: A warm-up call that touched at most this many new pages (4 MB of 4 KB pages) ends the warm-up.
WARM_PAGE_FAULTS = 1000
#: Warm-up calls at most, per kind.
MAX_WARM_UPS = 6


def _warm_up(call, device: torch.device) -> None:
    """Call until a call touches (almost) no new memory, at most :data:`MAX_WARM_UPS` times.

    glibc serves the large tensors of a step from its heap and, with 64-byte aligned requests
    (torch's), often cannot reuse the blocks the last step freed, so the heap grows over the first
    calls and each of them pays page faults: measured on a 2-core AMD EPYC, the paper model's DP step
    at batch 256 took 5.1, 3.1 and then 1.9-2.2 s (700k, 110k, then 0 faults), WRN-16-4's 13.8, 4.1 and
    then 3.0-3.2 s; each fault cost ~10 µs of system time there."""
    for _ in range(MAX_WARM_UPS):
        before = _minor_faults()
        call()
        synchronize(device)
        if _minor_faults() - before <= WARM_PAGE_FAULTS:
            break


def _timed(call, device: torch.device) -> float:
    """Wall-clock seconds of one call, the device's queued work included."""
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


def reference_speeds(device: torch.device, rows: int = 4096, inner: int = 1024, repeats: int = 5) -> dict[str, float]:
    """This machine's speed on the kernels a step is made of, float32, to tell machines apart and to
    read a table's figures against: a matrix product ``(rows, inner) @ (inner, inner)`` through
    ``torch.matmul`` (MKL on a CPU) and the same multiply-adds as a 1×1 convolution (oneDNN on a CPU,
    channels-last), a 3×3 convolution of 128 to 128 channels on 16×16 maps (the size of the paper
    model's middle layers), each in G multiply-adds/s; and a copy of ``rows × inner`` floats in GB/s
    (read + written), the bound of the memory passes over per-example gradients. Median of
    ``repeats`` calls after warm-up.

    Why these: on AMD processors MKL runs its AVX2 code while oneDNN compiles for the ISA at hand, so
    where a CPU has AVX-512 the convolutions of a plain step outrun the matrix products (measured on a
    family-26 EPYC: 81 against 212 G/s) and the figures of one machine do not carry to another. With
    more than one thread on a CPU, the matrix product once more on one thread: two virtual CPUs that are
    one physical core's two hardware threads share its vector units and barely add up."""
    if rows % 64:
        raise ValueError(f"rows must be a multiple of 64 (8×8 maps), got {rows}")
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape, channels_last=False):
        t = torch.randn(*shape, generator=generator).to(device)
        return t.contiguous(memory_format=torch.channels_last) if channels_last and device.type == "cpu" else t

    a, b = tensor(rows, inner), tensor(inner, inner)
    image, kernel = tensor(rows // 64, inner, 8, 8, channels_last=True), tensor(inner, inner, 1, 1, channels_last=True)
    maps, filters = tensor(rows // 64, 128, 16, 16, channels_last=True), tensor(128, 128, 3, 3, channels_last=True)
    kernels = {
        "matmul": (lambda: torch.matmul(a, b), rows * inner * inner),
        "1×1 conv": (lambda: torch.nn.functional.conv2d(image, kernel), rows * inner * inner),
        "3×3 conv": (lambda: torch.nn.functional.conv2d(maps, filters, padding=1), (rows // 64) * 256 * 128 * 128 * 9),
    }
    def per_second(call, work: float) -> float:
        for _ in range(3):  # the first calls of a process also start thread pools and fault memory in
            _timed(call, device)
        return work / statistics.median(_timed(call, device) for _ in range(repeats)) / 1e9

    speeds = {}
    with torch.no_grad():
        for name, (call, multiply_adds) in kernels.items():
            speeds[f"{name} G multiply-adds/s"] = per_second(call, multiply_adds)
        threads = torch.get_num_threads()
        if device.type == "cpu" and threads > 1:  # do the threads add up? (not where they share a core)
            torch.set_num_threads(1)
            try:
                speeds["matmul on 1 thread G multiply-adds/s"] = per_second(*kernels["matmul"])
            finally:
                torch.set_num_threads(threads)
        speeds["copy GB/s"] = per_second(a.clone, 2 * a.numel() * a.element_size())
    return speeds


def _time_kinds(calls: dict, device: torch.device, repeats: int) -> dict[str, tuple[float, float, float]]:
    """``{kind: (median seconds, peak MB, minor page faults per timed call)}``: each kind warms up
    (:func:`_warm_up`), then runs ``repeats`` timed calls in a row; its peak memory comes from one more,
    untimed call (on a CPU it starts by handing cached memory back to the OS, which would slow a
    timed call; the next kind's warm-up absorbs that)."""
    results = {}
    for kind, call in calls.items():
        _warm_up(call, device)
        faults_before = _minor_faults()
        seconds = [_timed(call, device) for _ in range(repeats)]
        faults = (_minor_faults() - faults_before) / repeats
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            call()
            synchronize(device)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        else:
            with _PeakRSS() as rss:
                call()
            peak = rss.megabytes
        results[kind] = (statistics.median(seconds), peak, faults)
    return results


def _alternating_ratios(reference, call, device: torch.device, rounds: int) -> list[float]:
    """Seconds of ``call`` over seconds of ``reference``, from ``rounds`` pairs of one call each, back to
    back (both warmed up already): each pair shares the machine's speed of that moment."""
    ratios = []
    for _ in range(rounds):
        plain = _timed(reference, device)
        ratios.append(_timed(call, device) / plain)
    return ratios


#: Measured last: the whole-model vmap reference allocates 2-8x more memory, and when the kinds took
#: turns call by call, a kind measured right after it ran up to 60% slower (the paper model's DP step
#: at batch 256: 5.04 s right after vmap, 3.11 s in a process without it).
ISOLATED_KINDS = ("vmap",)


def _model_and_batch(name: str, batch: int, *, views: int, device: torch.device, model: nn.Module | None,
                     seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model to time (``model``, or the named one built) in training mode on ``device``, and a
    random batch of ``views`` views per example with labels; on a CPU the allocator is tuned first."""
    torch.manual_seed(seed)
    if device.type == "cpu":
        tune_cpu_allocator()  # as the trainer does; applies to every kind alike
    if model is None:
        kind, kwargs = BENCHMARK_MODELS[name]
        model = build_model(kind, **kwargs)
    model = model.to(device).train()
    generator = torch.Generator(device=device).manual_seed(seed)
    images = torch.randn(batch, views, 3, 32, 32, generator=generator, device=device)
    labels = torch.randint(0, 10, (batch,), generator=generator, device=device)
    return model, images, labels


def _step_calls(name: str, batch: int, *, engines, views: int, device: torch.device, model: nn.Module | None,
                seed: int) -> tuple[dict, nn.Module]:
    """The calls to time, by kind (see the module docstring), and the model they train."""
    model, images, labels = _model_and_batch(name, batch, views=views, device=device, model=model, seed=seed)

    plain_optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def non_private():  # the trainer's non-private step: mean gradient over examples and views, update
        logical_step(model, plain_optimizer, [(images, labels)], 1, private=False, batch_size=batch)

    optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), noise_multiplier=1.0, max_grad_norm=1.0,
                            expected_batch_size=batch, loss_reduction="mean",
                            generator=torch.Generator(device=device).manual_seed(seed))

    def dp_step():
        logical_step(model, optimizer, [(images, labels)], 1, private=True, batch_size=batch, engine="auto")

    calls = {"non_private": non_private}
    for engine in engines:
        calls[engine] = (lambda fn: (lambda: fn(model, images, labels)))(ENGINE_FUNCTIONS[engine])
    calls["dp_step"] = dp_step
    return calls, model


def benchmark_model(name: str, batch: int, *, engines=("hooks", "vmap"), views: int = 1, repeats: int = 3,
                    pairs: int = 0, device: str = "auto", model: nn.Module | None = None,
                    seed: int = 0) -> list[Measurement]:
    """Measure one model at one physical batch size; ``pairs`` rounds of a non-private and a DP step
    back to back give the paired ratio (:func:`_alternating_ratios`); ``model`` overrides the named one (tests)."""
    dev = pick_device(device)
    calls, model = _step_calls(name, batch, engines=engines, views=views, device=dev, model=model, seed=seed)
    params, where = count_params(model), device_name(dev)
    order = [k for k in calls if k not in ISOLATED_KINDS] + [k for k in calls if k in ISOLATED_KINDS]
    timings = _time_kinds({kind: calls[kind] for kind in order}, dev, repeats)
    ratios = _alternating_ratios(calls["non_private"], calls["dp_step"], dev, pairs)
    results = []
    for kind in calls:
        seconds, peak, faults = timings[kind]
        paired = (statistics.median(ratios), min(ratios), max(ratios)) if kind == "dp_step" and ratios else ()
        results.append(Measurement(name, params, batch, views, kind, batch / seconds, seconds, peak, where, faults,
                                   *paired))
    model.zero_grad(set_to_none=True)
    return results


def phase_breakdown(name: str, batch: int, *, views: int = 1, repeats: int = 3, device: str = "auto",
                    model: nn.Module | None = None, seed: int = 0) -> dict[str, dict[str, float]]:
    """Mean seconds per phase of the non-private step and of the DP step (``{kind: {phase: s}}``),
    from ``repeats`` calls each after the warm-up of :func:`_warm_up`; ``"total"`` is the whole call and ``"other"`` what
    no phase covers (Python, hooks, variant masks). Phases: forward, backward (non-private) or
    activation backward + per-example filter gradients + pull-back (DP), clip/sum/noise, update."""
    dev = pick_device(device)
    calls, model = _step_calls(name, batch, engines=(), views=views, device=dev, model=model, seed=seed)
    breakdown = {}
    # the DP step first: after a non-private step had shaped the heap, WRN-16-4's DP step still touched
    # new memory after six warm-up calls; the other way round both became steady
    for kind in ("dp_step", "non_private"):
        _warm_up(calls[kind], dev)
        with measure_phases(dev) as times:
            start = time.perf_counter()
            for _ in range(repeats):
                calls[kind]()
            times.sync()
            total = time.perf_counter() - start
        seconds = {key: value / repeats for key, value in times.seconds.items()}
        seconds["other"] = total / repeats - sum(seconds.values())
        seconds["total"] = total / repeats
        breakdown[kind] = seconds
    model.zero_grad(set_to_none=True)
    return {kind: breakdown[kind] for kind in ("non_private", "dp_step")}


def layer_breakdown(name: str, batch: int, *, views: int = 1, repeats: int = 3, device: str = "auto",
                    model: nn.Module | None = None, seed: int = 0) -> list[dict]:
    """Per convolution of the DP step: milliseconds (median of ``repeats`` calls after one) of the summed
    weight gradient the non-private step computes, of the per-example filter gradients by each of the
    engine's two methods (:func:`~dpeq_utils.per_sample.grouped_filter_grads`, timed only on maps of at
    least :data:`~dpeq_utils.per_sample.GROUPED_MIN_PIXELS` pixels, where the engine may use it: on
    smaller maps with many channels oneDNN's grouped kernel took seconds), and of the pull-back of
    the method the engine uses, with the layer's multiply-adds (the same for all three products)."""
    from torch.nn.modules.utils import _pair

    from ..per_sample import (
        capture_layer_io,
        conv_rule,
        filter_grads_method,
        grouped_filter_grads,
        kernel_size,
        pull_back_to_parameters,
        unfold_filter_grads,
    )
    dev = pick_device(device)
    model, images, labels = _model_and_batch(name, batch, views=views, device=dev, model=model, seed=seed)
    layers, captured, _ = capture_layer_io(model, images, labels)

    def median_ms(call, prepare=None) -> float:
        times = []
        for _ in range(repeats + 1):
            argument = prepare() if prepare else None
            start = time.perf_counter()
            call(argument)
            synchronize(dev)
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times[1:])

    def row(layer_name: str, module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> dict:
        out_channels, in_channels = grad_out.shape[1], x.shape[1]
        pixels = grad_out.shape[2] * grad_out.shape[3]
        kernel = kernel_size(module)
        shape_only = x.new_empty(()).expand(out_channels, in_channels, *kernel)
        conv_args = (_pair(module.stride), _pair(module.padding), _pair(module.dilation), False, [0, 0], 1)
        grouped = filter_grads_method(pixels, x.device.type) is grouped_filter_grads
        per_example = conv_rule(module, x, grad_out, batch)
        return {
            "layer": layer_name,
            "channels": f"{in_channels}→{out_channels}",
            "map": f"{grad_out.shape[2]}×{grad_out.shape[3]}",
            "G multiply-adds": grad_out.shape[0] * out_channels * in_channels * kernel[0] * kernel[1] * pixels / 1e9,
            "summed ms": median_ms(lambda _: torch.ops.aten.convolution_backward(
                grad_out, x, shape_only, None, *conv_args, [False, True, False])),
            "grouped ms": median_ms(lambda _: grouped_filter_grads(module, x, grad_out, batch)) if grouped else math.nan,
            "unfold ms": median_ms(lambda _: unfold_filter_grads(module, x, grad_out, batch)),
            "engine uses": "grouped" if grouped else "unfold",
            # the pull-back may work in place: each call gets its own copy, made outside the timing
            "pull-back ms": median_ms(lambda fresh: pull_back_to_parameters(module, fresh),
                                      lambda: {key: value.clone() for key, value in per_example.items()}),
        }

    rows = [row(layer_name, module, *captured.pop(module)) for layer_name, module in layers.items()
            if module in captured and isinstance(module, (nn.Conv2d, enn.R2Conv))]
    model.zero_grad(set_to_none=True)
    return rows


def layer_table(rows: list[dict]) -> str:
    """Markdown table of :func:`layer_breakdown`, with a total row (the engine's method per layer)."""
    lines = ["| layer | channels | map | G multiply-adds | summed weight gradient ms | per-example grouped ms "
             "| per-example unfold ms | engine uses | pull-back ms |", "|---|---|---|---|---|---|---|---|---|"]

    def ms(value: float) -> str:
        return "" if math.isnan(value) else f"{value:.1f}"

    for row in rows:
        lines.append(f"| {row['layer']} | {row['channels']} | {row['map']} | {row['G multiply-adds']:.2f} | "
                     f"{ms(row['summed ms'])} | {ms(row['grouped ms'])} | {ms(row['unfold ms'])} | "
                     f"{row['engine uses']} | {ms(row['pull-back ms'])} |")
    used = sum(row[f"{row['engine uses']} ms"] for row in rows)
    lines.append(f"| total | | | {sum(r['G multiply-adds'] for r in rows):.2f} | {sum(r['summed ms'] for r in rows):.1f} "
                 f"| | | {used:.1f} | {sum(r['pull-back ms'] for r in rows):.1f} |")
    return "\n".join(lines)


def phase_table(breakdown: dict[str, dict[str, float]], title: str) -> str:
    """Markdown table of :func:`phase_breakdown`: seconds and share of the step per phase."""
    phases = list(dict.fromkeys(key for kind in breakdown.values() for key in kind if key != "total"))
    lines = [f"| {title} | non-private s | % | DP step s | % |", "|---|---|---|---|---|"]
    for key in phases + ["total"]:
        cells = []
        for kind in ("non_private", "dp_step"):
            value = breakdown[kind].get(key)
            share = None if value is None else 100 * value / breakdown[kind]["total"]
            cells += ["" if value is None else f"{value:.3f}", "" if share is None else f"{share:.0f}"]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_frame(measurements: list[Measurement]):
    """Long table (one row per measurement) as a pandas DataFrame."""
    import pandas as pd

    return pd.DataFrame([asdict(m) for m in measurements])


def summary_table(measurements: list[Measurement]) -> str:
    """Markdown table: examples/s per kind, the DP-step / non-private time ratio, peak memory."""
    frame = results_frame(measurements)
    rows = []
    engines = [k for k in frame["kind"].unique() if k not in ("non_private", "dp_step")]
    header = (["model", "params", "batch", "non-private ex/s"] + [f"{e} ex/s" for e in engines]
              + ["DP step ex/s", "DP step / non-private", "same, back-to-back pairs: median (range)",
                 "peak MB non-private", "peak MB DP step", "page faults / DP step"])
    for (model, batch), group in frame.groupby(["model", "batch"], sort=False):
        by_kind = group.set_index("kind")
        dp, plain = by_kind.loc["dp_step"], by_kind.loc["non_private"]
        row = [model, f"{by_kind['params'].iloc[0]:,}", str(batch), f"{plain['examples_per_s']:.0f}"]
        row += [f"{by_kind.loc[e, 'examples_per_s']:.0f}" for e in engines]
        paired = ("not run" if math.isnan(dp["paired_ratio"])
                  else f"{dp['paired_ratio']:.2f}× ({dp['paired_low']:.2f}–{dp['paired_high']:.2f})")
        row += [f"{dp['examples_per_s']:.0f}", f"{dp['seconds'] / plain['seconds']:.2f}×", paired,
                f"{plain['peak_mb']:.0f}", f"{dp['peak_mb']:.0f}", f"{dp['page_faults']:.0f}"]
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def epoch_ratio(measurements: list[Measurement], model: str, reference: str, batch: int) -> float:
    """Wall-clock of a DP epoch of ``model`` over that of ``reference`` (same batch, views, steps)."""
    frame = results_frame(measurements)
    seconds = frame[(frame["kind"] == "dp_step") & (frame["batch"] == batch)].set_index("model")["seconds"]
    return float(seconds[model] / seconds[reference])
