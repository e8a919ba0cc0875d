"""What a DP-SGD step costs on this machine: examples/s of a non-private step, of each per-example
gradient engine and of the whole DP step, per phase and per convolution, with the machine described
(``benchmarks/per_sample_speed.py``, ``python -m dpeq_utils benchmark``). How each figure is
measured is :mod:`.measure`'s docstring.

Rooms: :mod:`.measure` (timing a step and its parts), :mod:`.compute` (the published recipes' cost per example-view
gradient, the file the report reads), :mod:`.cli` (``python -m dpeq_utils benchmark``). The phase
timer the trainer and the engines carry (:func:`dpeq_utils.runtime.phase`) stays in ``runtime``:
it is part of every run, and costs nothing unless a benchmark measures; so does the machine's
description (:mod:`dpeq_utils.machine`), which every run record carries.
"""

from ..machine import CPU_CACHES, CPUINFO, ISA_FLAGS, machine_description  # noqa: F401
from .cli import main  # noqa: F401
from .compute import COMPUTE_RECORD, compute_record  # noqa: F401
from .measure import BENCHMARK_MODELS, Measurement, benchmark_model, layer_breakdown, phase_breakdown  # noqa: F401
