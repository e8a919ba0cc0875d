"""``python -m dpeq_utils benchmark`` (and ``benchmarks/per_sample_speed.py``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..machine import machine_description
from ..per_sample import ENGINE_FUNCTIONS
from ..runtime import (
    device_name,
    pick_device,
)
from . import measure
from .compute import COMPUTE_RECORD, compute_record


def main(argv: list[str] | None = None) -> int:
    from ..cli import command_parser, user_errors

    parser = command_parser("benchmark", "Examples/s of a non-private step, each per-example gradient engine and "
                            "the whole DP step.")
    parser.add_argument("--models", nargs="+", default=list(measure.BENCHMARK_MODELS), choices=list(measure.BENCHMARK_MODELS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256], help="physical batch sizes")
    parser.add_argument("--engines", nargs="+", default=sorted(ENGINE_FUNCTIONS), choices=sorted(ENGINE_FUNCTIONS))
    parser.add_argument("--views", type=int, default=1, help="augmentation views per example")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per figure (median); one more warms up")
    parser.add_argument("--pairs", type=int, default=5,
                        help="rounds of a non-private and a DP step back to back for the paired ratio (0: none)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--phases", action="store_true",
                        help="also break the non-private and the DP step down into phases (forward, backward, ...)")
    parser.add_argument("--layers", action="store_true",
                        help="also time each convolution's summed and per-example filter gradients and pull-back")
    parser.add_argument("--csv", default=None, help="also write the long table here")
    parser.add_argument("--rounds", type=int, default=5,
                        help="--compute-record: interleaved rounds, each timing every recipe once (default 5)")
    parser.add_argument("--compute-record", default=None, metavar="PATH",
                        help="only measure the published recipes' cost per DP example-view gradient and write it as "
                             f"JSON (the report reads data/reference/{COMPUTE_RECORD}); run on an idle machine")
    args = parser.parse_args(argv)
    with user_errors(parser.prog, args.debug):
        return _run(parser, args)


def _run(parser, args) -> int:
    from ..runtime import environment_report

    if args.compute_record:
        import json

        from ..paths import write_atomic

        record = compute_record(rounds=args.rounds, device=args.device)
        write_atomic(Path(args.compute_record), lambda handle: json.dump(record, handle, indent=1))
        print(json.dumps(record["recipes"], indent=1))
        print(f"wrote {args.compute_record}")
        return 0
    if args.views < 1 or args.repeats < 1 or min(args.batch_sizes) < 1:
        parser.error("--views, --repeats and --batch-sizes must be positive")
    if args.pairs < 0:
        parser.error("--pairs must be 0 or more")

    device = pick_device(args.device)
    print(f"device: {device_name(device)}; torch threads: {torch.get_num_threads()}")
    print("machine: " + "; ".join(f"{key}: {value}" for key, value in machine_description(device).items()))
    before = measure.reference_speeds(device)
    print("reference kernels at the start (float32): " + "; ".join(f"{key} {value:.0f}" for key, value in before.items()))
    print(environment_report())
    measurements = []
    for name in args.models:
        for batch in args.batch_sizes:
            for m in measure.benchmark_model(name, batch, engines=args.engines, views=args.views, repeats=args.repeats,
                                     pairs=args.pairs, device=args.device):
                print(f"  {m.model:17s} B={m.batch:<4d} {m.kind:12s} {m.examples_per_s:9.1f} ex/s "
                      f"{m.seconds:8.3f} s  peak {m.peak_mb:8.0f} MB  page faults/call {m.page_faults:9.0f}"
                      + ("" if math.isnan(m.paired_ratio) else f"  DP/non-private in pairs {m.paired_ratio:.2f}×"),
                      flush=True)
                measurements.append(m)
    print()
    print(measure.summary_table(measurements))
    if {"eq_resnet9", "wrn16_4"} <= set(args.models):
        for batch in args.batch_sizes:
            ratio = measure.epoch_ratio(measurements, "eq_resnet9", "wrn16_4", batch)
            print(f"\nDP epoch wall-clock, eq_resnet9 / wrn16_4 at physical batch {batch}, {args.views} view(s): "
                  f"{ratio:.3f} ({100 * (1 - ratio):.0f}% less)")
    if args.phases:
        for name in args.models:
            for batch in args.batch_sizes:
                breakdown = measure.phase_breakdown(name, batch, views=args.views, repeats=args.repeats, device=args.device)
                print(f"\n{name}, B={batch}, {args.views} view(s): seconds per step by phase\n")
                print(measure.phase_table(breakdown, "phase"))
    if args.layers:
        for name in args.models:
            for batch in args.batch_sizes:
                print(f"\n{name}, B={batch}, {args.views} view(s): filter gradients per convolution\n")
                print(measure.layer_table(measure.layer_breakdown(name, batch, views=args.views, repeats=args.repeats, device=args.device)))
    after = measure.reference_speeds(device)
    print("\nreference kernels at the end (float32): " + "; ".join(f"{key} {value:.0f}" for key, value in after.items()))
    drift = {key: after[key] / before[key] - 1 for key in before}
    print("machine speed drift over the run: " + ", ".join(f"{key.split(' G')[0]} {100 * value:+.0f}%"
                                                         for key, value in drift.items())
          + " (a shared machine's speed varies; compare figures of one run, and see whether it moved)")
    if args.csv:
        measure.results_frame(measurements).to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    return 0
