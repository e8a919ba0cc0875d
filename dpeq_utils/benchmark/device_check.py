"""The first thing to run on a GPU (``python benchmarks/gpu_check.py``): is dpeq's device path right
there, and what does it cost? About five minutes on one GPU; ``--device cpu --tiny`` runs every
check on a CPU in under a minute (the test suite does).

Each section prints its figures and a verdict line (``ok`` / ``FAILED``); the exit code is 1 if any
check failed. In order:

1. **environment** — device, driver, torch/CUDA/cuDNN versions, TF32 flags as PyTorch left them and
   as a dpeq run sets them;
2. **per-example gradients** — both engines against the naive per-example loop on the device, in
   float64 (relative error ≤ 1e-12) and float32 (≤ 1e-4), for the paper model, a plain ResNet-9 and
   WRN-16-4;
3. **resume** — plain DP-SGD, pruning + dropping and ModelMix: a run stopped after a step and resumed
   from its checkpoint against the same run uninterrupted, with ``deterministic=True``: bit for bit, or
   the largest difference and the operations PyTorch warned have no deterministic kernel;
4. **smoke training** — the smoke profile on the device: seconds, accuracy, ε;
5. **speed** — the paper model with 4 views at physical batch 256 and 1,024 (or the largest that fits):
   examples/s, peak memory, seconds per phase, and the hours one paper run (2,160 × 8,192 × 4 views)
   would take at that speed; WRN-16-4 with 16 views: peak memory per example-view;
6. **tests** — ``tests/test_device.py`` with the real device instead of the simulated one
   (``DPEQ_TEST_DEVICE``), when the tests are there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ..runtime import configure_device, device_name, pick_device


class _Checks:
    def __init__(self):
        self.failed: list[str] = []

    def verdict(self, name: str, ok: bool, detail: str = "") -> None:
        print(f"  [{'ok' if ok else 'FAILED'}] {name}{': ' + detail if detail else ''}", flush=True)
        if not ok:
            self.failed.append(name)


def _section(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def environment(device: torch.device) -> None:
    from ..machine import machine_description
    from ..runtime import environment_report

    for key, value in environment_report(device).items():
        print(f"  {key}: {value}")
    if device.type == "cuda":
        driver = "unknown"
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip() or driver
        except (OSError, subprocess.SubprocessError):
            pass
        print(f"  driver: {driver}; CUDA {torch.version.cuda}; cuDNN {torch.backends.cudnn.version()}")
        print(f"  TF32 as PyTorch left it: matmul {torch.backends.cuda.matmul.allow_tf32}, "
              f"cuDNN {torch.backends.cudnn.allow_tf32}")
        configure_device(device)
    for key, value in machine_description(device).items():
        print(f"  {key}: {value}")


def per_example_gradients(device: torch.device, checks: _Checks, tiny: bool) -> None:
    from ..models import build_model
    from ..per_sample import ENGINE_FUNCTIONS, naive_per_sample_grads

    widths = (2, 2, 4) if tiny else (4, 8, 16)
    models = (("eq_resnet9", {"widths": widths}), ("resnet9", {"widths": widths})) + (() if tiny else (("wrn16_4", {}),))
    for name, kwargs in models:
        for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
            torch.manual_seed(0)
            model = build_model(name, **kwargs).to(device=device, dtype=dtype).train()
            generator = torch.Generator().manual_seed(1)
            views = torch.randn(3, 2, 3, 32, 32, generator=generator, dtype=dtype).to(device)
            labels = torch.randint(0, 10, (3,), generator=generator).to(device)
            reference = naive_per_sample_grads(model, views, labels)
            for engine, function in ENGINE_FUNCTIONS.items():
                try:
                    grads, _ = function(model, views, labels)
                except NotImplementedError as err:  # a model the hooks engine has no rule for
                    print(f"  {name} {engine}: not applicable ({err})")
                    continue
                error = max(float((grads[k] - reference[k]).norm() / reference[k].norm().clamp_min(1e-300))
                            for k in reference)
                checks.verdict(f"{name} {engine} {str(dtype).split('.')[-1]}", error <= tolerance,
                               f"relative error {error:.1e} (≤ {tolerance:g})")


def resume(device: torch.device, checks: _Checks, tiny: bool) -> None:
    from .. import train as train_module
    from ..config import RunConfig
    from ..runs import run

    base = RunConfig(profile="gpu-check", dataset="synthetic", train_size=48 if tiny else 512, test_size=16 if tiny else 256,
                     model="resnet9", widths=(4, 4, 4) if tiny else (16, 32, 64), batch_size=12 if tiny else 128,
                     physical_batch_size=6 if tiny else 64, aug_mult=2, update_steps=3, lr=0.5, device=str(device),
                     checkpoint_every=1, deterministic=True)
    variants = {"plain": {}, "pruning + dropping": {"prune_rate": 0.3, "drop_rate": 0.2, "drop_method": "magnitude"},
                "ModelMix": {"modelmix": True}}
    original = train_module.train_step
    for name, change in variants.items():
        config = base.replace(**change)
        with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reference = run(config, Path(folder) / "whole", progress=False)

            def dying(state, stop=[True]):  # noqa: B006 - one stop, then the resumed run goes on
                if state.step == 2 and stop:
                    stop.clear()
                    raise KeyboardInterrupt
                return original(state)
            train_module.train_step = dying
            try:
                try:
                    run(config, Path(folder) / "stopped", progress=False)
                except KeyboardInterrupt:
                    pass
                resumed = run(config, Path(folder) / "stopped", progress=False)
            finally:
                train_module.train_step = original
        same = all(resumed[k] == reference[k] for k in ("test_loss", "test_accuracy", "test_accuracy_ema"))
        nondeterministic = sorted({str(w.message).split(" does not have")[0] for w in caught
                                   if "deterministic" in str(w.message)})
        checks.verdict(f"resume on the device, {name}", resumed.get("resumed_at_steps") == [2] and same,
                       ("bit for bit" if same else f"test loss {resumed['test_loss']!r} against {reference['test_loss']!r}")
                       + (f"; no deterministic kernel for: {'; '.join(nondeterministic)}" if nondeterministic else ""))


def smoke_training(device: torch.device, checks: _Checks, tiny: bool) -> None:
    from ..config import config_from_profile
    from ..runs import run

    changes = {"update_steps": 2, "train_size": 128, "test_size": 64, "batch_size": 32} if tiny else {}
    config = config_from_profile("smoke", device=str(device), **changes)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        record = run(config, folder, progress=False)
    checks.verdict("smoke training", record["epsilon_spent"] <= config.target_epsilon,
                   f"{time.perf_counter() - started:.1f} s, test accuracy {record['test_accuracy']:.3f} (EMA "
                   f"{record['test_accuracy_ema']:.3f}), ε = {record['epsilon_spent']:.3f} ≤ {config.target_epsilon:g}")


def speed(device: torch.device, tiny: bool) -> None:
    from ..config import config_from_profile
    from ..models import build_model
    from . import measure

    paper = config_from_profile("paper")
    examples = paper.update_steps * paper.batch_size
    # --tiny: small stand-ins for the paper model and WRN-16-4, so that a CPU runs the code path in seconds
    stand_in = (lambda name: build_model("resnet9" if name == "wrn16_4" else name, widths=(2, 2, 4))) if tiny else None
    if tiny:
        print("  (--tiny: small models stand in for the paper model and WRN-16-4; the figures are not theirs)")
    for batch in ((4, 8) if tiny else (256, 1024)):
        try:
            dp = next(m for m in measure.benchmark_model("eq_resnet9", batch, engines=(), views=paper.aug_mult,
                                                         repeats=3, device=str(device),
                                                         model=stand_in and stand_in("eq_resnet9"))
                      if m.kind == "dp_step")
        except torch.OutOfMemoryError:
            print(f"  eq_resnet9, {paper.aug_mult} views, physical batch {batch}: out of memory")
            torch.cuda.empty_cache()
            continue
        hours = examples / dp.examples_per_s / 3600
        print(f"  eq_resnet9, {paper.aug_mult} views, physical batch {batch}: {dp.examples_per_s:.3g} examples/s, peak "
              f"{dp.peak_mb:.0f} MB; one paper run ({paper.update_steps:,} × {paper.batch_size:,} examples) ≈ {hours:.2f} h")
        phases = measure.phase_breakdown("eq_resnet9", batch, views=paper.aug_mult, repeats=2, device=str(device),
                                         model=stand_in and stand_in("eq_resnet9"))
        print("  seconds per DP step by phase: " + ", ".join(f"{k} {v:.3f}" for k, v in phases["dp_step"].items()))
    batch, views = (2, 16) if tiny else (32, 16)
    wrn = next(m for m in measure.benchmark_model("wrn16_4", batch, engines=(), views=views, repeats=1,
                                                  device=str(device), model=stand_in and stand_in("wrn16_4"))
               if m.kind == "dp_step")
    print(f"  wrn16_4, {views} views, physical batch {batch}: peak {wrn.peak_mb:.0f} MB, "
          f"{wrn.peak_mb / (batch * views):.1f} MB per example-view")


def device_tests(device: torch.device, checks: _Checks) -> None:
    tests = Path(__file__).resolve().parents[2] / "tests" / "test_device.py"
    if device.type != "cuda" or not tests.is_file():
        print("  skipped (" + ("not a GPU: the suite runs them on the simulated device" if device.type != "cuda"
                               else f"{tests} is not there") + ")")
        return
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                            env={**os.environ, "DPEQ_TEST_DEVICE": str(device)}, capture_output=True, text=True)
    print("  " + (result.stdout.strip().splitlines() or ["(no output)"])[-1])
    checks.verdict("tests/test_device.py on the device", result.returncode == 0)


def main(argv: list[str] | None = None) -> int:
    from ..cli import command_parser

    parser = command_parser("gpu-check", __doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (the GPU if there is one), cuda[:N], cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models and batches (a dry run of every check)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["gradients", "resume", "smoke", "speed", "tests"])
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    checks = _Checks()
    started = time.perf_counter()
    _section(f"environment ({device_name(device)})")
    environment(device)
    for key, title, call in (("gradients", "per-example gradients against the naive loop", per_example_gradients),
                             ("resume", "stop and resume on the device", resume),
                             ("smoke", "smoke training on the device", smoke_training),
                             ("speed", "speed and memory", lambda d, c, t: speed(d, t)),
                             ("tests", "the device tests on the real device", lambda d, c, t: device_tests(d, c))):
        if key in args.skip:
            continue
        begun = _section(title)
        try:
            call(device, checks, args.tiny)
        except Exception as err:  # noqa: BLE001 - a failed section is reported; the others still run
            checks.verdict(title, False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        print(f"  ({time.perf_counter() - begun:.0f} s)")
    print(f"\n{len(checks.failed)} check(s) failed" + (f": {', '.join(checks.failed)}" if checks.failed else "")
          + f"; {time.perf_counter() - started:.0f} s in all")
    return 1 if checks.failed else 0
