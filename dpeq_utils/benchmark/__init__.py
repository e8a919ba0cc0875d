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
  clipping, noise, SGD update (Opacus ``DPOptimizer``, as :func:`dpeq_utils.train.logical_step`).

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

Rooms: :mod:`.measure` (timing a step and its parts), :mod:`.machine` (what a figure depends on:
CPU, caches, vector units, threads), :mod:`.compute` (the published recipes' cost per example-view
gradient, the file the report reads), :mod:`.cli` (``python -m dpeq_utils benchmark``). The phase
timer the trainer and the engines carry (:func:`dpeq_utils.runtime.phase`) stays in ``runtime``:
it is part of every run, and costs nothing unless a benchmark measures.
"""

from .cli import main  # noqa: F401
from .compute import COMPUTE_RECORD, compute_record  # noqa: F401
from .machine import CPU_CACHES, CPUINFO, ISA_FLAGS, machine_description  # noqa: F401
from .measure import (  # noqa: F401
    BENCHMARK_MODELS,
    ISOLATED_KINDS,
    MAX_WARM_UPS,
    WARM_PAGE_FAULTS,
    Measurement,
    benchmark_model,
    epoch_ratio,
    layer_breakdown,
    layer_table,
    phase_breakdown,
    phase_table,
    reference_speeds,
    results_frame,
    summary_table,
)
