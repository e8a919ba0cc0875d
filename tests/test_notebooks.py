"""The notebooks: structure, a full smoke reproduction through papermill, and the runner's failure path."""

import json
import os
import re
from pathlib import Path

import nbformat
import papermill
import pytest
import yaml

from dpeq_utils import reproduce
from dpeq_utils.config import field_names, load_profile
from dpeq_utils.records import load_records

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXPECTED = ["01_equivariance_theory", "02_model_construction", "03_dpsgd_training", "04_ablation_parameters",
            "05_ablation_epsilon", "06_baselines"]

#: No cell of any notebook takes this long under smoke or teach; the limit turns a lost kernel message
#: (nbclient/papermill can wait forever for a reply that never comes: nteract/papermill#711, seen once
#: here on a loaded machine) into a failure with a traceback instead of a stalled CI run.
CELL_TIMEOUT_S = 900


def run_in_lanes(profile: str, lanes: list[list[str]], out_dir: Path, monkeypatch) -> list[reproduce.NotebookResult]:
    """Every notebook of ``lanes`` under ``profile``: each lane (notebook prefixes, run in order) in its
    own thread, side by side, each kernel on one CPU thread; the results in notebook order, every
    notebook having run without error.

    Why: at smoke and teach sizes a kernel gains little from torch's second thread (notebook 03 under
    smoke: 57 s with one thread or two), so two one-thread lanes nearly halve the wall time on a 2-core
    machine, while two kernels of two threads each oversubscribe it (measured here: the smoke
    reproduction took 512 s that way, 134 s in one-thread lanes, 223 s one notebook after another).
    Notebooks that share records stay in one lane (03-06 train and read one study)."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # read by torch in each kernel this process starts
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    with ThreadPoolExecutor(len(lanes)) as pool:
        done = pool.map(lambda only: reproduce.run_notebooks(profile, out_dir=out_dir, only=only,
                                                            cell_timeout=CELL_TIMEOUT_S, echo=lambda *_: None), lanes)
        results = sorted((r for lane in done for r in lane), key=lambda r: r.name)
    failures = {r.name: r.error for r in results if not r.ok}
    assert not failures, failures
    return results


def test_the_six_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS][:6] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_structure(path):
    raw = json.loads(Path(path).read_text())  # nbformat.read would fill in missing cell ids, with only a warning
    ids = [cell.get("id") for cell in raw["cells"]]
    assert None not in ids and len(set(ids)) == len(ids), "every cell needs its own id (nbformat 4.5)"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"), \
        "notebooks are committed without outputs"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    params = papermill.inspect_notebook(str(path))
    assert "profile" in params
    for name, spec in params.items():
        assert spec["help"], f"parameter {name} needs a trailing comment (it becomes papermill's help text)"
        assert spec["inferred_type_name"] != "None", f"parameter {name} needs a type annotation"
    # the template: aim, runtime table, discussion, exercises, references
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for heading in ("**Aim.**", "| profile |", "## Discussion", "## Exercises", "## References"):
        assert heading in text, heading


@pytest.mark.parametrize("profile", ["smoke", "teach", "paper"])
def test_profiles_name_only_real_parameters(profile):
    content = load_profile(profile)
    assert set(content["run"]) <= set(field_names())
    for stem, section in (content.get("notebooks") or {}).items():
        path = REPO / "notebooks" / f"{stem}.ipynb"
        assert path.is_file(), f"profile {profile} configures a missing notebook {stem}"
        assert set(section or {}) <= set(papermill.inspect_notebook(str(path))), (profile, stem)


def test_environment_yml_agrees_with_pyproject():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    deps = env["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python="))
    version = tuple(int(v) for v in python.split("=")[1].split("."))
    pyproject = (REPO / "pyproject.toml").read_text()
    low, high = re.search(r'requires-python = ">=(\d+\.\d+),<(\d+\.\d+)"', pyproject).groups()
    assert tuple(map(int, low.split("."))) <= version < tuple(map(int, high.split(".")))
    assert "gfortran" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert pip == ["-e .[dev]"], "the conda route installs the package with its pinned dependencies"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme


def _notebook(path: Path, source: str):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile: str = "smoke"  # profile')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(source)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_runner_reports_a_failing_notebook_and_runs_the_rest(tmp_path, capsys):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    _notebook(notebooks / "01_fine.ipynb", "print('fine', profile)")
    _notebook(notebooks / "02_broken.ipynb", "raise RuntimeError('deliberate failure')")
    _notebook(notebooks / "03_after.ipynb", "open('ran.txt', 'w').write(profile)")
    code = reproduce.main(["--profile", "smoke", "--out", str(tmp_path / "out"), "--notebooks-dir", str(notebooks)])
    printed = capsys.readouterr().out
    assert code == 1
    assert "FAILED 02_broken: cell 2 of the executed copy" in printed  # papermill inserts the parameters cell
    assert "RuntimeError: deliberate failure" in printed
    assert f"executed copy with the traceback: {tmp_path / 'out' / '02_broken.ipynb'}" in printed
    assert (notebooks / "ran.txt").read_text() == "smoke", "the notebook after the failure still ran"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["01_fine.ipynb", "02_broken.ipynb", "03_after.ipynb"]


def test_runner_interrupted_marks_the_partial_notebook_and_exits_130(tmp_path, capsys, monkeypatch):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    for stem in ("01_fine", "02_long", "03_never"):
        _notebook(notebooks / f"{stem}.ipynb", "print('hello')")
    real = papermill.execute_notebook

    def interrupted_on_the_second(source, output, **kwargs):
        if "02_long" in source:
            Path(output).write_text(Path(source).read_text())  # papermill had written a partial copy
            raise KeyboardInterrupt
        return real(source, output, **kwargs)

    monkeypatch.setattr(papermill, "execute_notebook", interrupted_on_the_second)
    monkeypatch.setenv("DPEQ_RUNS_DIR", str(tmp_path / "elsewhere"))
    code = reproduce.main(["--profile", "smoke", "--out", str(tmp_path / "out"), "--notebooks-dir", str(notebooks),
                           "--figures-dir", str(tmp_path / "figs")])
    printed = capsys.readouterr().out
    assert code == 130
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["01_fine.ipynb", "02_long.INTERRUPTED.ipynb"]
    assert re.search(r"01_fine\s+ok", printed) and re.search(r"02_long\s+INTERRUPTED", printed)
    assert re.search(r"03_never\s+not run", printed)
    assert "partly executed copy" in printed and "02_long.INTERRUPTED.ipynb" in printed
    import os

    assert os.environ["DPEQ_FIGURES_DIR"] == str((tmp_path / "figs").resolve()), "the kernels inherit the folder"


def test_runner_only_and_list(tmp_path, capsys):
    assert [p.stem for p in reproduce.discover(only=["03"])] == ["03_dpsgd_training"]
    with pytest.raises(ValueError, match="no notebook matches"):
        reproduce.discover(only=["99"])
    assert reproduce.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(stem in listed for stem in EXPECTED) and "train_missing = " in listed and "profile = " in listed


@pytest.mark.slow
def test_smoke_reproduction_of_every_notebook(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setenv("DPEQ_RUNS_DIR", str(runs))
    monkeypatch.delenv("DPEQ_REFERENCE_DIR")  # the shipped teach study, shown beside the smoke runs
    # 01, 02 and 07 read no study records; 03-06 share the smoke study
    results = run_in_lanes("smoke", [["01", "02", "07"], ["03", "04", "05", "06"]], tmp_path / "executed", monkeypatch)
    assert [r.name for r in results] == [p.stem for p in NOTEBOOKS], "every notebook, none left out of the lanes"
    records = load_records(runs / "smoke")
    # the smoke study (notebooks 03-06): every run of parts A-E
    from dpeq_utils.study import Study

    study = Study("smoke", runs_dir=runs / "smoke")
    assert study.missing(records={r["key"]: r for r in records}) == [], "the notebooks completed the smoke study"
    variants = [r for r in records if r["config"]["model"] == "wrn16_4" and r["config"]["clip_norm"] == 1.0]
    assert {(r["config"]["aug_mult"], r["config"]["prune_rate"] > 0, r["config"]["modelmix"]) for r in variants} >= {
        (4, False, False), (1, True, False), (1, False, True)}, "De et al., pruning+dropping and ModelMix runs of 06"
    for record in records:
        if record["epsilon_spent"] is not None:
            assert record["epsilon_spent"] <= record["config"]["target_epsilon"]
        assert 0.0 <= record["test_accuracy"] <= 1.0
    figures = tmp_path / "figures" / "smoke"
    for name in ("01_rotation_error_curve", "02_parameter_counts", "03_learning_curves", "03_epsilon_spent",
                 "04_accuracy_by_model", "04_accuracy_by_group", "05_accuracy_vs_epsilon", "06_baselines"):
        assert (figures / f"{name}.png").stat().st_size > 1000 and (figures / f"{name}.pdf").is_file()
    executed = nbformat.read(tmp_path / "executed" / "04_ablation_parameters.ipynb", as_version=4)
    markdown = [o["data"]["text/markdown"] for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
                if "text/markdown" in o.get("data", {})]
    assert any("not distinguishable from" in m or "higher than" in m or "lower than" in m for m in markdown), \
        "the verdict sentence is generated from the records"
    assert_both_audit_bounds(nbformat.read(tmp_path / "executed" / "07_privacy_audit.ipynb", as_version=4), runs=5)
    for path in NOTEBOOKS:  # with the solutions in place, every exercise's check says right
        cells = nbformat.read(tmp_path / "executed" / path.name, as_version=4).cells
        checks = ["".join(o.get("text", "") for o in c.get("outputs", [])) for c in cells if "check" in _tags(c)]
        assert checks and all(text.startswith("right:") for text in checks), (path.stem, checks)


@pytest.mark.parametrize("stem", ["04_ablation_parameters", "05_ablation_epsilon", "06_baselines", "07_privacy_audit"])
def test_teach_notebooks_render_the_shipped_records_without_training(stem, tmp_path, monkeypatch):
    """Under teach, notebooks 04-07 read data/reference/teach/ (07: its audit/ records) and train
    nothing (no dataset needed)."""
    monkeypatch.delenv("DPEQ_REFERENCE_DIR")
    monkeypatch.setenv("DPEQ_RUNS_DIR", str(tmp_path / "runs"))
    path = REPO / "notebooks" / f"{stem}.ipynb"
    papermill.execute_notebook(str(path), str(tmp_path / f"{stem}.ipynb"), kernel_name="python3", progress_bar=False,
                               execution_timeout=CELL_TIMEOUT_S,
                               parameters=reproduce.notebook_parameters(path, "teach"), cwd=str(REPO / "notebooks"))
    assert not (tmp_path / "runs").exists(), "nothing was trained"
    assert (tmp_path / "figures" / "teach").is_dir()
    if stem == "07_privacy_audit":  # all five cases read from the shipped audit records
        executed = nbformat.read(tmp_path / f"{stem}.ipynb", as_version=4)
        text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))
        assert text.count("data/reference/teach/audit/") == 5 and "non-private:" in text and "broken" in text
        assert_both_audit_bounds(executed, runs=5)


def assert_both_audit_bounds(executed, runs: int) -> None:
    """Notebook 07, executed: every run's sentence gives both conversions of its black-box and
    white-box audits (Steinke et al., f-DP), and the comparison of the two is generated."""
    markdown = "\n".join(o["data"]["text/markdown"] for c in executed.cells if c.cell_type == "code"
                         for o in c.get("outputs", []) if "text/markdown" in o.get("data", {}))
    per_run = [line for line in markdown.splitlines() if line.startswith("* **") and "black-box ε ≥" in line]
    assert len(per_run) == runs, per_run
    assert all(line.count("by Steinke et al.") == 2 and line.count("by f-DP") == 2 for line in per_run), per_run
    assert "**Which conversion is tighter:**" in markdown


REAL_CIFAR = Path(os.environ.get("DPEQ_TEST_CIFAR10", "/nonexistent")).expanduser()


@pytest.mark.slow
@pytest.mark.skipif(not REAL_CIFAR.exists(), reason="set DPEQ_TEST_CIFAR10 to a local CIFAR-10 copy to run this")
def test_teach_notebooks_that_compute_on_cifar10_render(tmp_path, monkeypatch):
    """Notebook 03, the one that computes most on CIFAR-10 itself under teach (sections 0-6¾ on real
    images, section 7 from the shipped study, training none of it), renders with a local copy
    (``.ci/run`` passes one when the machine has it). Its own DP-SGD run (section 6¾) trains 4 steps
    here instead of the profile's 40: the same path, and the suite stays fast (the README's notebook
    table times the profile's). 01 and 02 run the same code under smoke (02 reads no data at all); 04-07
    render the shipped records in the test above."""
    monkeypatch.delenv("DPEQ_REFERENCE_DIR")
    monkeypatch.setenv("DPEQ_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("DPEQ_CIFAR10", str(REAL_CIFAR))
    results = reproduce.run_notebooks("teach", out_dir=tmp_path / "executed", only=["03"], cell_timeout=CELL_TIMEOUT_S,
                                      echo=lambda *_: None,
                                      parameters={"03": {"try_steps": 4, "try_examples": 500, "try_test": 200}})
    assert [(r.name, r.ok) for r in results] == [("03_dpsgd_training", True)], results[0].error
    executed = nbformat.read(tmp_path / "executed" / "03_dpsgd_training.ipynb", as_version=4)
    assert any("4 steps spent ε" in o.get("data", {}).get("text/markdown", "") for c in executed.cells
               for o in c.get("outputs", [])), "03 trained the student's run with the parameters given"
    assert not (tmp_path / "runs").exists(), "nothing of the study was trained"


def _tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_is_assignable(path):
    """A lecturer can hand it out: at least one exercise asks the student to edit code (a cell tagged
    `exercise`), followed by its answer (tagged `solution`, removed from the student edition) and a
    check cell (tagged `check`) that says right or not yet; every answer, code or text, is tagged."""
    nb = nbformat.read(path, as_version=4)
    tags = [_tags(c) for c in nb.cells]
    exercises = [i for i, t in enumerate(tags) if "exercise" in t]
    assert exercises, "no exercise asks the student to edit code"
    for i in exercises:
        assert nb.cells[i].cell_type == "code"
        check = next((j for j in range(i + 1, len(tags)) if "check" in tags[j]), None)
        assert check is not None, f"exercise cell {i} has no check cell after it"
        assert any("solution" in tags[j] for j in range(i + 1, check)), f"exercise cell {i}: no solution before its check"
        assert "dpeq_utils.exercises" in nb.cells[check].source or "check_" in nb.cells[check].source
    solutions = "\n".join(c.source for c, t in zip(nb.cells, tags) if "solution" in t)
    assert "## Solutions" in solutions or not any("## Solutions" in c.source for c in nb.cells), \
        "the Solutions section is tagged as a solution"


def test_the_student_edition_has_no_solution_and_no_output(tmp_path, capsys):
    assert reproduce.main(["--student", "--out", str(tmp_path)]) == 0
    assert "student edition of 7 notebook(s) written" in capsys.readouterr().out
    for path in NOTEBOOKS:
        full, student = nbformat.read(path, as_version=4), nbformat.read(tmp_path / path.name, as_version=4)
        nbformat.validate(student)
        assert not any("solution" in _tags(c) for c in student.cells)
        assert len(student.cells) == len(full.cells) - sum("solution" in _tags(c) for c in full.cells)
        assert sum("exercise" in _tags(c) for c in student.cells) == sum("exercise" in _tags(c) for c in full.cells)
        assert all(not c.get("outputs") for c in student.cells if c.cell_type == "code")
        assert not any("## Solutions" in c.source for c in student.cells)


@pytest.mark.slow
def test_a_student_edition_runs_before_any_exercise_is_done(tmp_path, monkeypatch):
    """The student edition of notebook 01 runs from top to bottom under smoke with every exercise left
    as handed out: each check says "not done yet" instead of stopping the notebook."""
    reproduce.student_edition(tmp_path / "student", only=["01"])
    monkeypatch.setenv("DPEQ_RUNS_DIR", str(tmp_path / "runs"))
    results = reproduce.run_notebooks("smoke", out_dir=tmp_path / "executed", notebooks_dir=tmp_path / "student",
                                      cell_timeout=CELL_TIMEOUT_S, echo=lambda *_: None)
    assert [r.ok for r in results] == [True], results[0].error
    executed = nbformat.read(tmp_path / "executed" / NOTEBOOKS[0].name, as_version=4)
    checks = "".join(o.get("text", "") for c in executed.cells if "check" in _tags(c) for o in c.get("outputs", []))
    assert checks.count("not done yet") >= 1 and "right:" not in checks
