"""Bad input and faults: records are verified, problems are found before the work, errors speak
without tracebacks, interrupted outputs never look valid, and one run is trained by one process."""

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from dpeq_utils import preflight
from dpeq_utils.config import RunConfig, config_from_profile
from dpeq_utils.data import load_splits
from dpeq_utils.preflight import PreflightError
from dpeq_utils.privacy import PrivacyBudgetError, calibrate_noise, epsilon_spent
from dpeq_utils.records import RecordError, record_path, results_table, write_json_atomic
from dpeq_utils.runs import RunLocked, load_or_run, run_lock

REPO = Path(__file__).resolve().parents[1]
TINY = dict(train_size=64, test_size=16, batch_size=16, physical_batch_size=16, update_steps=1, eval_every=0,
            aug_mult=1, device="cpu")


@pytest.fixture
def tiny_record(tmp_path):
    config = config_from_profile("smoke", **TINY)
    return config, load_or_run(config, runs_dir=tmp_path / "runs", progress=False)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dpeq_utils", "train", "--no-progress", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300, env={**os.environ, **(env or {})})


# ---------------------------------------------------------------------------------------------- records


def test_an_edited_record_is_refused(tiny_record, tmp_path):
    config, record = tiny_record
    path = record_path(config, tmp_path / "runs")
    text = path.read_text()
    assert f'"test_accuracy": {record["test_accuracy"]}' in text
    path.write_text(text.replace(f'"test_accuracy": {record["test_accuracy"]}', '"test_accuracy": 0.99', 1))
    with pytest.raises(RecordError, match="changed after it was written"):
        load_or_run(config, runs_dir=tmp_path / "runs")


def test_a_folder_with_one_bad_record_names_it(tiny_record, tmp_path):
    """A results table over a folder with a broken file fails naming that file: silently dropping a run
    would change every mean and interval computed from the table."""
    (tmp_path / "runs" / "eq_resnet9-D4-0000000000000000.json").write_text('{"key": ')
    with pytest.raises(RecordError, match="eq_resnet9-D4-0000000000000000.json is not valid JSON"):
        results_table(tmp_path / "runs")


def test_records_say_what_data_they_trained_on_and_are_readable_by_others(tiny_record, tmp_path):
    config, record = tiny_record
    splits = load_splits(config.dataset, train_size=config.train_size, test_size=config.test_size, seed=config.seed)
    assert record["data"]["train_sha256"] == splits.train.digest()
    assert record["data"]["test_sha256"] == splits.test.digest()
    assert record["data"]["verified"] == "deterministic generator"
    mode = record_path(config, tmp_path / "runs").stat().st_mode & 0o777
    assert mode & 0o044 == 0o044, f"record mode {oct(mode)}: others sharing the folder cannot read it"


def test_cli_says_when_a_record_was_read_not_trained(tmp_path):
    args = ["--runs-dir", str(tmp_path), *sum((["--set", f"{k}={v}"] for k, v in TINY.items()), [])]
    first, second = _cli(*args), _cli(*args)
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    assert "read from" not in first.stdout
    assert "read from" in second.stdout and "(trained 20" in second.stdout
    assert first.stdout.strip().splitlines()[-1] == second.stdout.strip().splitlines()[-1], "the record's path, last"


# ---------------------------------------------------------------------------------------------- before the work


def test_an_unwritable_output_folder_is_found_before_training(tmp_path, monkeypatch):
    import dpeq_utils.train

    monkeypatch.setattr(dpeq_utils.train, "train", lambda *a, **k: pytest.fail("trained before checking the folder"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PreflightError, match="cannot write run records to .*nothing was trained"):
        load_or_run(config_from_profile("smoke", **TINY), runs_dir=blocker / "runs")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda _: type("U", (), {"free": 10 * 2 ** 20})())
    with pytest.raises(PreflightError, match="only 10 MB free"):
        load_or_run(config_from_profile("smoke", **TINY), runs_dir=tmp_path / "runs")


def test_a_run_that_would_not_fit_in_memory_is_refused_unless_forced(tmp_path, monkeypatch):
    config = config_from_profile("smoke", **TINY)
    from dpeq_utils.train import build_model_for

    estimate = preflight.estimate_memory_mb(config, build_model_for(config), 64 + 16)
    monkeypatch.setenv("DPEQ_MEMORY_LIMIT_MB", str(estimate / 2))
    with pytest.raises(PreflightError, match="needs about .* GB of memory, .* is available: lower physical_batch_size"):
        load_or_run(config, runs_dir=tmp_path, progress=False)
    assert not list(tmp_path.glob("**/*.json")), "nothing was written"
    monkeypatch.setenv("DPEQ_MEMORY_LIMIT_MB", str(estimate * 1.1))
    with pytest.warns(ResourceWarning, match="close to the"):
        load_or_run(config, runs_dir=tmp_path / "warned", progress=False)
    monkeypatch.setenv("DPEQ_MEMORY_LIMIT_MB", str(estimate / 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        assert load_or_run(config, runs_dir=tmp_path / "forced", progress=False, force_memory=True)["steps"] == 1


def test_the_memory_estimate_grows_with_the_physical_batch():
    from dpeq_utils.train import build_model_for

    config = config_from_profile("smoke", **TINY)
    model = build_model_for(config)
    small, large = (preflight.estimate_memory_mb(config.replace(physical_batch_size=b), model, 80) for b in (16, 4096))
    assert large > 8 * small / 2 and large > 20_000 > small


def test_sizes_are_checked_with_the_config():
    with pytest.raises(ValueError, match="test_size must be at most 50,000 for synthetic"):
        RunConfig(test_size=300_000)
    with pytest.raises(ValueError, match="train_size \\+ validation_size must be at most 50,000 for cifar10"):
        RunConfig(dataset="cifar10", train_size=49_500, validation_size=1_000)
    with pytest.raises(ValueError, match="widths must be three positive integers"):
        RunConfig(widths=[4, True, 8])


def test_an_epsilon_below_the_rdp_floor_says_what_is_true():
    with pytest.raises(PrivacyBudgetError, match="cannot certify ε=0.05 .* adds at least 0.103 .* accountant='prv'"):
        calibrate_noise(0.05, 1e-5, 0.125, 1, "rdp")
    sigma = calibrate_noise(0.05, 1e-5, 0.125, 1, "prv")  # PRV calibrates without RDP's help
    assert epsilon_spent(sigma, 0.125, 1, 1e-5, "prv") <= 0.05


# ---------------------------------------------------------------------------------------------- errors speak


#: 300 bytes of YAML ("billion laughs"): 9 ** 7 = 4.8 million values once its aliases are expanded.
_LAUGHS = "[" + ", ".join(["&a [1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
    f"&{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(5)] + [f"[{', '.join(['*f'] * 9)}]"]) + "]"


#: (command-line arguments, exit status, what the one sentence says)
FORESEEABLE = [
    (["--set", "widths=4"], 2, "widths must be three positive integers of at most 1024, got 4"),
    (["--set", "widths=[100000,8,8]"], 2, "at most 1024"),
    (["--set", "group=C4096"], 2, "more rotations than dpeq builds"),  # refused before any model is built
    (["--set", "profile=teach"], 2, "chosen with --profile"),
    (["--profile", "BAD_YAML"], 2, "is not valid YAML"),
    (["--profile", "UNSAFE_YAML"], 2, "holds more than plain data"),
    (["--set", "widths=[4,8"], 2, "could not read the value of widths"),
    (["--set", "device=cuda"], 1, "CUDA is not available here"),
    (["--set", "target_delta=0.01"], 1, "is not below 1/N"),
    (["--set", "batch_size=9999"], 1, "exceeds the 512 training examples"),
    # issue 38: small inputs that exhausted memory or CPU, and values that ended in tracebacks
    (["--profile", "BILLION_LAUGHS"], 2, "once its YAML aliases (*name) are expanded"),
    (["--set", "widths=" + _LAUGHS], 2, "the value of widths holds more than 100,000 values"),
    (["--profile", "LIST_FOR_NAME"], 2, "dataset must be a name (a string), got ['synthetic']"),
    (["--profile", "LIST_AS_LABEL"], 2, "profile must be a plain name"),
    (["--profile", "ESCAPING_LABEL"], 2, "profile must be a plain name"),
    (["--set", "lr=1e300"], 2, "lr must be a positive number of at most 1e+06, got 1e+300"),
    (["--set", "update_steps=10000000000"], 2, "update_steps must be a positive integer of at most 100,000"),
    (["--set", "update_steps=null", "--set", "epochs=1e+9"], 1, "more than the 100,000 a run may take"),
    (["--set", "widths=[1024,1024,1024]"], 1, "needs about 27.0 GB of memory before training starts"),
]

def _profiles(folder: Path) -> dict[str, str]:
    """The profile files the cases name, written into ``folder``."""
    tiny = "train_size: 64, test_size: 16, batch_size: 16, physical_batch_size: 16, update_steps: 1, widths: [4, 4, 4]"
    return {"BAD_YAML": "run: {model: [unclosed\n",
            "UNSAFE_YAML": f"run: !!python/object/apply:os.system ['touch {folder / 'ran'}']\n",
            "BILLION_LAUGHS": f"run: {{lr: {_LAUGHS}}}\n",
            "LIST_FOR_NAME": f"run: {{dataset: [synthetic], {tiny}}}\n",
            "LIST_AS_LABEL": f"run: {{profile: [a, b], {tiny}}}\n",
            "ESCAPING_LABEL": f"run: {{profile: ../../escaped, {tiny}}}\n"}


#: Runs every case of FORESEEABLE through the real command line in **one** fresh process (no CUDA, a fixed
#: memory limit), each with its own stderr and exit status: a process per case spent ~4 s of its ~4.5 s
#: importing torch and escnn.
_EVERY_CASE = """
import contextlib, io, json, sys
from dpeq_utils.__main__ import main
results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(["train", "--no-progress", *args])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    results.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def foreseeable_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("foreseeable")
    profiles = _profiles(folder)
    for name, text in profiles.items():
        (folder / f"{name}.yaml").write_text(text)
    argv = [[str(folder / f"{a}.yaml") if a in profiles else a for a in args] for args, _, _ in FORESEEABLE]
    done = subprocess.run([sys.executable, "-c", _EVERY_CASE, json.dumps(argv)], capture_output=True, text=True,
                          cwd=REPO, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "DPEQ_MEMORY_LIMIT_MB": "8000"})
    assert done.returncode == 0, done.stderr
    return folder, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", range(len(FORESEEABLE)), ids=[m[:40] for _, _, m in FORESEEABLE])
def test_foreseeable_errors_get_one_sentence_and_no_traceback(case, foreseeable_results):
    folder, results = foreseeable_results
    _, code, message = FORESEEABLE[case]
    result = results[case]
    assert not (folder / "ran").exists() and not (folder / "escaped").exists() and not (REPO / "escaped").exists()
    assert result["code"] == code, result["stderr"]
    assert message in result["stderr"] and "Traceback" not in result["stderr"]
    assert len(result["stderr"]) < 2000, "one sentence, not an expanded value"


def test_the_command_line_speaks_in_its_own_process():
    """The batched cases above call the command's main(); this one goes through ``python -m dpeq_utils``."""
    result = _cli("--set", "widths=4")
    assert result.returncode == 2 and "widths must be three positive integers" in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback():
    result = _cli("--set", "target_delta=0.01", "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr and "is not below 1/N" in result.stderr


def test_a_missing_cifar10_copy_is_one_sentence(tmp_path):
    result = _cli("--profile", "teach", "--set", "train_size=100", env={"DPEQ_CIFAR10": str(tmp_path / "nowhere"),
                                                                         "DPEQ_DATA_DIR": str(tmp_path)})
    assert result.returncode == 1 and "no CIFAR-10 copy at" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------- partial outputs


def test_an_interrupted_figure_save_leaves_no_file_under_the_real_name(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dpeq_utils.plotting import savefig

    fig, _ = plt.subplots()
    calls = []

    def dies_on_pdf(handle, *a, **k):
        calls.append(k["format"])
        if k["format"] == "pdf":
            handle.write(b"%PDF-1.4 trunc")
            raise KeyboardInterrupt
        handle.write(b"png")

    monkeypatch.setattr(fig, "savefig", dies_on_pdf)
    with pytest.raises(KeyboardInterrupt):
        savefig(fig, "figure", "smoke")
    folder = tmp_path / "figures" / "smoke"
    assert sorted(p.name for p in folder.iterdir()) == ["figure.png"], "no truncated PDF, no temporary file"


def test_atomic_record_writes_leave_nothing_when_interrupted(tmp_path, monkeypatch):
    monkeypatch.setattr(json, "dump", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(tmp_path / "r.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- concurrency


def test_a_second_process_on_the_same_run_is_told_who_trains_it(tmp_path):
    config = config_from_profile("smoke", **TINY)
    path = record_path(config, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from dpeq_utils.runs import run_lock\n"
        f"with run_lock(Path({str(path)!r})):\n    print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"pid {holder.pid} on .* is training this run already"):
            load_or_run(config, runs_dir=tmp_path, progress=False)
    finally:
        holder.kill()
        holder.wait()
    # the operating system released the killed holder's lock: the run proceeds
    assert load_or_run(config, runs_dir=tmp_path, progress=False)["steps"] == 1
    assert not list(path.parent.glob("*.lock")), "the lock file is removed with the record written"
    with run_lock(path):
        pass


# ---------------------------------------------------------------------------------------------- issue 38: bounded inputs


def test_every_config_field_of_the_wrong_type_or_size_gets_a_sentence():
    """A list where a number or a name belongs, a mapping, a path as the label, an absurd magnitude:
    each field's problem is one short sentence (a ValueError), never a TypeError from deeper down."""
    from dpeq_utils.config import field_names

    nested: list = [1]
    for _ in range(6):
        nested = [nested] * 10  # what a YAML alias bomb hands over (smaller: a failure's report prints it)
    for name in field_names():
        for value in ([1], {"a": 1}, "x", None, 1e300, True, -1, ["D4"], "../../x", nested):
            try:
                RunConfig(**{name: value})
            except ValueError as err:
                assert len(str(err)) < 400, (name, value, str(err)[:200])
    with pytest.raises(ValueError, match="profile must be a plain name"):
        RunConfig(profile="../../../../tmp/escaped")


def test_yaml_whose_aliases_expand_to_millions_is_refused_quickly():
    import time
    import tracemalloc

    from dpeq_utils.config import parse_assignment

    started = time.perf_counter()
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="the value of widths holds more than 100,000 values") as caught:
            parse_assignment("widths=" + _LAUGHS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 2 and peak < 200 * 2 ** 20 and len(str(caught.value)) < 300


def test_a_model_too_big_to_build_is_refused_before_it_is_built(monkeypatch):
    """widths=[1024]*3 passes the per-field cap; escnn would need ~28 GB to build it. The estimate comes
    from the widths alone, before any filter is expanded."""
    import dpeq_utils.train as train_module

    monkeypatch.setattr(train_module, "build_model_for", lambda config: pytest.fail("built before estimating"))
    monkeypatch.setenv("DPEQ_MEMORY_LIMIT_MB", "8000")
    config = config_from_profile("smoke", **{**TINY, "widths": (1024, 1024, 1024)})
    with pytest.raises(PreflightError, match="building eq_resnet9 at widths \\[1024, 1024, 1024\\].*nothing was built"):
        train_module.setup(config)


def test_a_record_nested_200000_deep_is_one_sentence(tmp_path):
    config = config_from_profile("smoke", **TINY)
    path = record_path(config, tmp_path)
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(RecordError, match=re.escape(str(path)) + " nests lists or objects deeper"):
        load_or_run(config, runs_dir=tmp_path, progress=False)


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(json, "dump", full)
    path = tmp_path / "runs" / "r.json"
    with pytest.raises(OSError, match=re.escape(f"could not write {path}: No space left on device; nothing was left")):
        write_json_atomic(path, {"a": 1})
    assert list(path.parent.iterdir()) == []
