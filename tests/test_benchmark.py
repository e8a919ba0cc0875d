"""The speed benchmark's machinery (tiny sizes; the figures themselves live in the README, not in tests)."""

import subprocess
import sys
from pathlib import Path

import pytest

from dpeq_utils.benchmark import benchmark_model, epoch_ratio, summary_table
from dpeq_utils.models import build_model
from dpeq_utils.runtime import tune_cpu_allocator

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_measures_every_kind_and_tabulates():
    measurements = []
    for name, model in (("eq_resnet9", build_model("eq_resnet9", widths=(4, 8, 8))),
                        ("wrn16_4", build_model("resnet9", widths=(4, 8, 8)))):  # stand-in: small and fast
        measurements += benchmark_model(name, 4, views=2, repeats=1, device="cpu", model=model)
    kinds = [m.kind for m in measurements[:4]]
    assert kinds == ["non_private", "hooks", "vmap", "dp_step"]
    assert all(m.examples_per_s > 0 and m.seconds > 0 and m.batch == 4 and m.views == 2 for m in measurements)
    table = summary_table(measurements).splitlines()
    assert len(table) == 4 and table[0].startswith("| model | params | batch | non-private ex/s | hooks ex/s")
    ratio = epoch_ratio(measurements, "eq_resnet9", "wrn16_4", 4)
    dp = {m.model: m.seconds for m in measurements if m.kind == "dp_step"}
    assert ratio == pytest.approx(dp["eq_resnet9"] / dp["wrn16_4"])


def test_benchmark_script_runs():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "per_sample_speed.py"), "--models",
                             "eq_resnet9_small", "--batch-sizes", "2", "--repeats", "1", "--engines", "hooks"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "| eq_resnet9_small | 60,203 | 2 |" in result.stdout and "device: cpu" in result.stdout


def test_allocator_tuning_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("DPEQ_MALLOC_TUNING", "0")
    assert tune_cpu_allocator() is False
