"""The speed benchmark's machinery (tiny sizes; the figures themselves live in the README, not in tests)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from dpeq_utils import machine as machine_module
from dpeq_utils.benchmark.measure import (
    benchmark_model,
    epoch_ratio,
    layer_breakdown,
    layer_table,
    phase_breakdown,
    phase_table,
    reference_speeds,
    summary_table,
)
from dpeq_utils.machine import machine_description
from dpeq_utils.models import build_model
from dpeq_utils.per_sample import GROUPED_MIN_PIXELS
from dpeq_utils.runtime import measure_phases, phase, tune_cpu_allocator

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_measures_every_kind_and_tabulates():
    measurements = []
    for name, model in (("eq_resnet9", build_model("eq_resnet9", widths=(4, 8, 8))),
                        ("wrn16_4", build_model("resnet9", widths=(4, 8, 8)))):  # stand-in: small and fast
        measurements += benchmark_model(name, 4, views=2, repeats=1, pairs=3 if name == "eq_resnet9" else 0,
                                        device="cpu", model=model)
    kinds = [m.kind for m in measurements[:4]]
    assert kinds == ["non_private", "hooks", "vmap", "dp_step"]
    assert all(m.examples_per_s > 0 and m.seconds > 0 and m.batch == 4 and m.views == 2 for m in measurements)
    paired = measurements[3]
    assert 0 < paired.paired_low <= paired.paired_ratio <= paired.paired_high
    assert all(math.isnan(m.paired_ratio) for m in measurements if m is not paired)  # DP step with pairs only
    table = summary_table(measurements).splitlines()
    assert len(table) == 4 and table[0].startswith("| model | params | batch | non-private ex/s | hooks ex/s")
    assert f"| {paired.paired_ratio:.2f}× ({paired.paired_low:.2f}–" in table[2] and "| not run |" in table[3]
    ratio = epoch_ratio(measurements, "eq_resnet9", "wrn16_4", 4)
    dp = {m.model: m.seconds for m in measurements if m.kind == "dp_step"}
    assert ratio == pytest.approx(dp["eq_resnet9"] / dp["wrn16_4"])


def test_benchmark_script_runs():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "per_sample_speed.py"), "--models",
                             "eq_resnet9_small", "--batch-sizes", "2", "--repeats", "1", "--engines", "hooks",
                             "--phases", "--layers"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "| eq_resnet9_small | 60,203 | 2 |" in result.stdout and "device: cpu" in result.stdout
    assert "torch cpu capability: " in result.stdout and "| per-example filter gradients |" in result.stdout
    assert "reference kernels at the start (float32): matmul G multiply-adds/s " in result.stdout
    assert "machine speed drift over the run: matmul " in result.stdout
    assert "filter gradients per convolution" in result.stdout and "| conv1.conv | 3→24 | 32×32 |" in result.stdout


def test_layer_breakdown_times_every_convolution_by_each_method():
    """One row per convolution in model order; the grouped method only where the engine may use it."""
    model = build_model("eq_resnet9", widths=(4, 8, 8))
    rows = layer_breakdown("eq_resnet9", 3, views=2, repeats=1, device="cpu", model=model)
    convolutions = [name for name, module in model.named_modules() if type(module).__name__ == "StandardizedR2Conv"]
    assert [row["layer"] for row in rows] == convolutions
    for row in rows:
        pixels = math.prod(int(side) for side in row["map"].split("×"))
        assert row["engine uses"] == ("grouped" if pixels >= GROUPED_MIN_PIXELS else "unfold")
        assert math.isnan(row["grouped ms"]) == (pixels < GROUPED_MIN_PIXELS)
        assert all(row[key] > 0 for key in ("summed ms", "unfold ms", "pull-back ms", "G multiply-adds"))
    first = rows[0]  # 3 input channels to 8, 3×3 filters, 32×32 map, 3 examples × 2 views
    assert first["channels"] == "3→8" and first["G multiply-adds"] == pytest.approx(6 * 8 * 3 * 9 * 1024 / 1e9)
    table = layer_table(rows).splitlines()
    assert len(table) == len(rows) + 3 and table[-1].startswith("| total |")
    assert f"| {sum(row[row['engine uses'] + ' ms'] for row in rows):.1f} |" in table[-1]


def test_phase_breakdown_covers_the_whole_step():
    """Every second of a step is in one phase or in "other"; the DP step's phases are the engine's."""
    model = build_model("eq_resnet9", widths=(4, 8, 8))
    breakdown = phase_breakdown("eq_resnet9", 4, views=2, repeats=1, device="cpu", model=model)
    assert set(breakdown["non_private"]) == {"forward", "backward", "update", "other", "total"}
    assert {"forward", "activation backward", "per-example filter gradients", "pull-back (basis, standardisation)",
            "clip, sum, noise", "update"} < set(breakdown["dp_step"])
    for seconds in breakdown.values():
        assert sum(v for k, v in seconds.items() if k != "total") == pytest.approx(seconds["total"])
        assert all(v > 0 for k, v in seconds.items() if k not in ("other", "update"))
    table = phase_table(breakdown, "phase").splitlines()
    assert table[-1].startswith("| total |") and table[-1].count("| 100 |") == 2


def test_phases_are_measured_only_inside_measure_phases():
    with phase("outside"):
        pass
    with measure_phases() as times:
        with phase("a"):
            pass
        with phase("a"):
            pass
    assert list(times.seconds) == ["a"] and times.seconds["a"] >= 0


def test_machine_description_names_the_cpu_and_its_vector_units():
    description = machine_description()
    assert description["cpu"] and description["torch threads"].isdigit()
    assert description["torch cpu capability"] == __import__("torch").backends.cpu.get_cpu_capability()
    assert description["isa"] and "usable of" in description["cores"]


def test_machine_description_tells_apart_machines_with_one_cpu_model(tmp_path, monkeypatch):
    """Clock, caches and whether it is a virtual machine come from /proc/cpuinfo and sysfs (here fakes)."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 1\nstepping\t: 1\n"
                       "cpu MHz\t\t: 2445.406\ncache size\t: 512 KB\nflags\t\t: fpu avx2 fma hypervisor\n\n"
                       "processor\t: 1\nmodel name\t: other\n")
    caches = tmp_path / "cache"
    for index, kind, level, size in (("index0", "Data", 1, "32K"), ("index1", "Instruction", 1, "64K"),
                                     ("index2", "Unified", 2, "512K"), ("index3", "Unified", 3, "32768K")):
        (caches / index).mkdir(parents=True)
        (caches / index / "type").write_text(f"{kind}\n")
        (caches / index / "level").write_text(f"{level}\n")
        (caches / index / "size").write_text(f"{size}\n")
    (caches / "uevent").write_text("")
    monkeypatch.setattr(machine_module, "CPUINFO", str(cpuinfo))
    monkeypatch.setattr(machine_module, "CPU_CACHES", str(caches))
    description = machine_description()
    assert description["cpu"] == "AMD EPYC (family 25, model 1, stepping 1) in a virtual machine"
    assert description["clock"] == "2445 MHz as reported"
    assert description["caches"] == "L1 32K, L2 512K, L3 32768K"
    assert description["isa"] == "avx2 fma"
    monkeypatch.setattr(machine_module, "CPU_CACHES", str(tmp_path / "absent"))
    description = machine_description()
    assert description["caches"] == "512 KB (/proc/cpuinfo's cache size)"
    cpuinfo.write_text("model name\t: Some CPU\nflags\t\t: sse2\n")
    description = machine_description()
    assert description["cpu"] == "Some CPU" and "clock" not in description and "caches" not in description
    assert description["isa"] == "unknown"


def test_reference_speeds_measure_each_kernel():
    import torch

    speeds = reference_speeds(torch.device("cpu"), rows=128, inner=32, repeats=1)
    expected = {"matmul G multiply-adds/s", "1×1 conv G multiply-adds/s", "3×3 conv G multiply-adds/s", "copy GB/s"}
    assert expected <= set(speeds) and all(math.isfinite(v) and v > 0 for v in speeds.values())
    assert ("matmul on 1 thread G multiply-adds/s" in speeds) == (torch.get_num_threads() > 1)
    with pytest.raises(ValueError, match="multiple of 64"):
        reference_speeds(torch.device("cpu"), rows=100)


def test_allocator_tuning_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("DPEQ_MALLOC_TUNING", "0")
    assert tune_cpu_allocator() is False



def test_allocator_tuning_never_trims_the_heap(monkeypatch):
    """The trim threshold must be 'never' (-1), not 2**31 - 1: with the latter glibc gave back a freed heap
    top over 2 GB (WRN-16-4's DP step at batch 256: ~2.9 GB, systrim from free) and the next step faulted
    it in again (590,000 page faults per step, measured). Checked on the calls made: glibc does not report
    its thresholds."""
    calls = []

    class FakeGlibc:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))
            return 1

    monkeypatch.setattr("dpeq_utils.runtime._glibc", lambda: FakeGlibc())
    monkeypatch.delenv("DPEQ_MALLOC_TUNING", raising=False)
    assert tune_cpu_allocator() is True
    m_trim_threshold, m_mmap_threshold = -1, -3
    assert dict(calls) == {m_trim_threshold: -1, m_mmap_threshold: 2 ** 31 - 1}


def test_the_compute_record_times_the_recipes_in_interleaved_rounds_and_the_report_reads_it(tmp_path, monkeypatch):
    """One process, the published recipes' models with their own views (the paper's, De et al.'s ε = 8 with
    WRN-16-4 and with WRN-40-4), timed in rounds whose order alternates; the report's comparison comes
    from that file only (study timings shared the CPU), as the median and range of per-round ratios."""
    import json

    from dpeq_utils import report
    from dpeq_utils.benchmark import COMPUTE_RECORD, compute_record
    from dpeq_utils.benchmark import compute as compute_module

    assert report.recipe_compute().empty, "no compute record: no comparison"
    order = []
    timed = compute_module._timed
    monkeypatch.setattr(compute_module, "_timed", lambda call, device: order.append(call) or timed(call, device))
    record = compute_record(example_views=16, rounds=2, device="cpu")
    recipes = record["recipes"]
    assert list(recipes) == ["paper", "de_et_al_eps8", "de_et_al_eps8_wrn40_4"]
    assert [r["views"] for r in recipes.values()] == [4, 16, 16]
    assert [r["model"] for r in recipes.values()] == ["eq_resnet9", "wrn16_4", "wrn40_4"]
    assert recipes["de_et_al_eps8_wrn40_4"]["parameters"] > 3 * recipes["de_et_al_eps8"]["parameters"]
    assert all(len(r["ms_per_example_view_rounds"]) == 2 and r["ms_per_example_view"] > 0 for r in recipes.values())
    assert order[:3] == order[3:][::-1], "the second round times the recipes in the reverse order"
    assert record["machine"] and set(record["reference_speeds"]) == {"start", "end"} and record["source_sha256"]
    path = tmp_path / "reference" / COMPUTE_RECORD
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    from dpeq_utils.shipped import write_manifest

    write_manifest(path.parents[1], accept=True)  # the test's reference folder, vouched for by its manifest
    table = report.recipe_compute()
    assert list(table["views"]) == [4, 16, 16] and (table["CPU hours (2 cores)"] > 0).all()
    ratio = report.cost.compute_ratio(table, "de_et_al_eps8")
    assert ratio["rounds"] == 2 and ratio["low"] <= ratio["median"] <= ratio["high"]
    sentence = report.readme.compute_sentence(table)
    assert "CPU time on one machine" in sentence and "neither confirms nor refutes" in sentence and "WRN-40-4" in sentence


@pytest.mark.slow
def test_the_gpu_check_runs_every_check_on_a_cpu_in_its_tiny_dry_run(capsys):
    """benchmarks/gpu_check.py is the first thing to run on a GPU: its code paths must work before one
    is there. On a CPU with --tiny every section runs (the device tests skip: the suite runs them on
    the simulated device) and every check passes."""
    from dpeq_utils.benchmark.device_check import main

    assert main(["--device", "cpu", "--tiny"]) == 0
    out = capsys.readouterr().out
    for section in ("== environment", "== per-example gradients", "== stop and resume", "== smoke training",
                    "== speed and memory", "== the device tests"):
        assert section in out
    assert out.count("[ok]") == 2 * 2 * 2 + 3 + 1 and "FAILED" not in out and "0 check(s) failed" in out
    assert out.count("[ok] resume on the device") == 3 and "bit for bit" in out
