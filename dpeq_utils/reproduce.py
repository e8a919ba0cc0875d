"""Rerun every notebook under a profile with papermill: ``python -m dpeq_utils reproduce --profile smoke``.

Each notebook ``notebooks/NN_name.ipynb`` is executed headlessly with kernel ``python3``, the
parameter ``profile`` and the notebook's section of the profile file (``notebooks: {NN_name:
{...}}``) injected, and an execution timeout per cell. Executed copies go to ``--out`` (default
``notebooks/executed/<profile>/``), run records to ``data/runs/<profile>/``, figures to
``figures/<profile>/``. A failing notebook does not stop the others; the run ends with a summary
naming each failure and its failing cell, and exits non-zero if any failed. ``--runs-dir`` and
``--figures-dir`` move records and figures too (the kernels inherit them as ``DPEQ_RUNS_DIR`` and
``DPEQ_FIGURES_DIR``). Interrupted with Ctrl-C, the notebook that was running is renamed
``NN_name.INTERRUPTED.ipynb`` (its cells would otherwise look complete), the summary lists what
finished, and the exit status is 130.

``--student`` writes the **student edition** instead (nothing is executed): every notebook with its
solution cells removed (cells tagged ``solution``) and no outputs, to ``--out`` (default
``notebooks/student/``), ready for a course page; its exercises' check cells then check the
student's own code (:mod:`dpeq_utils.exercises`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .paths import REPO_ROOT
from .profiles import load_profile

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"


@dataclass
class NotebookResult:
    name: str
    ok: bool
    seconds: float
    output: Path | None  # the executed copy, None when none was written
    error: str = ""
    status: str = ""  # "ok", "FAILED", "INTERRUPTED" or "not run"

    def __post_init__(self):
        self.status = self.status or ("ok" if self.ok else "FAILED")


def discover(notebooks_dir: Path = NOTEBOOKS_DIR, only: list[str] | None = None) -> list[Path]:
    """Numbered notebooks (``NN_*.ipynb``) in order, filtered by ``only`` (prefixes such as ``03``)."""
    found = sorted(p for p in Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))
    if only:
        chosen = [p for p in found if any(p.stem.startswith(o) or p.stem == o for o in only)]
        unknown = [o for o in only if not any(p.stem.startswith(o) for p in found)]
        if unknown:
            raise ValueError(f"no notebook matches {unknown}; available: {[p.stem for p in found]}")
        return chosen
    return found


def notebook_parameters(notebook: Path, profile: str) -> dict:
    """What papermill injects: the profile's name and the notebook's section of the profile file."""
    section = (load_profile(profile).get("notebooks") or {}).get(notebook.stem) or {}
    return {"profile": Path(profile).stem, **section}


def _describe_failure(error: Exception, output: Path) -> str:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(error, PapermillExecutionError):
        first_line = error.source.strip().splitlines()[0] if error.source.strip() else ""
        return f"cell {error.cell_index} of the executed copy ({first_line!r}): {error.ename}: {error.evalue}"
    running = _running_cell(output)
    return f"{type(error).__name__}: {error}" + (f" (while running {running})" if running else "")


def _running_cell(output: Path) -> str | None:
    """The cell papermill had marked running in a partly written executed copy (a dead kernel's last cell)."""
    import nbformat

    try:
        nb = nbformat.read(output, as_version=4)
    except Exception:  # noqa: BLE001 - no copy, or a partial one: nothing to name
        return None
    for index, cell in enumerate(nb.cells):
        if cell.get("metadata", {}).get("papermill", {}).get("status") == "running":
            first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
            return f"cell {index} ({first!r})"
    return None


def run_notebooks(profile: str, out_dir: Path | None = None, only: list[str] | None = None,
                  notebooks_dir: Path = NOTEBOOKS_DIR, cell_timeout: int = 3600, kernel: str = "python3",
                  echo=print, parameters: dict[str, dict] | None = None) -> list[NotebookResult]:
    """Execute the notebooks (all, or those whose names start with one of ``only``) under ``profile``,
    each with the profile's parameters for it; ``parameters`` (notebook prefix → {name: value}) changes
    some of them on top, e.g. ``{"03": {"try_steps": 4}}``."""
    import papermill

    notebooks = discover(notebooks_dir, only)
    name = Path(profile).stem
    out_dir = Path(out_dir) if out_dir is not None else NOTEBOOKS_DIR / "executed" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    echo(shipped_records_note(profile))
    results = []
    for i, notebook in enumerate(notebooks, 1):
        output = out_dir / notebook.name
        output.unlink(missing_ok=True)  # an old copy must not pass for this run's
        echo(f"[{i}/{len(notebooks)}] {notebook.stem} (profile {name}) ...")
        started = time.perf_counter()
        try:
            given = notebook_parameters(notebook, profile)
            for prefix, changed in (parameters or {}).items():
                if notebook.stem.startswith(prefix):
                    given = {**given, **changed}
            papermill.execute_notebook(str(notebook), str(output), parameters=given,
                                       kernel_name=kernel, execution_timeout=cell_timeout, cwd=str(notebook.parent),
                                       progress_bar=False, log_output=False)
            result = NotebookResult(notebook.stem, True, time.perf_counter() - started, output)
        except KeyboardInterrupt:
            marked = None
            if output.exists():
                marked = output.with_name(f"{notebook.stem}.INTERRUPTED.ipynb")
                output.replace(marked)
            results.append(NotebookResult(notebook.stem, False, time.perf_counter() - started, marked,
                                          "interrupted (Ctrl-C)", "INTERRUPTED"))
            results += [NotebookResult(n.stem, False, 0.0, None, "", "not run") for n in notebooks[i:]]
            raise Interrupted(results) from None
        except Exception as error:  # noqa: BLE001 - one failing notebook must not stop the others
            result = NotebookResult(notebook.stem, False, time.perf_counter() - started,
                                    output if output.exists() else None, _describe_failure(error, output))
        echo(f"      {result.status} in {result.seconds:.1f} s -> {result.output or 'no executed copy'}")
        results.append(result)
    return results


#: The cell tag that marks an answer: removed from the student edition.
SOLUTION_TAG = "solution"


def student_edition(out_dir: Path, notebooks_dir: Path = NOTEBOOKS_DIR, only: list[str] | None = None) -> list[Path]:
    """Write every notebook without its solution cells (tagged :data:`SOLUTION_TAG`) and without
    outputs to ``out_dir``; returns the written paths. A notebook with no solution cell is refused:
    its answers would be handed out."""
    import nbformat

    from .paths import write_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for notebook in discover(notebooks_dir, only):
        nb = nbformat.read(notebook, as_version=4)
        kept = [c for c in nb.cells if SOLUTION_TAG not in c.get("metadata", {}).get("tags", [])]
        if len(kept) == len(nb.cells):
            raise ValueError(f"{notebook.name} has no cell tagged {SOLUTION_TAG!r}: its answers cannot be told apart "
                             "from the rest, so no student edition is written for it")
        for cell in kept:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        nb.cells = kept
        path = out_dir / notebook.name
        write_atomic(path, lambda handle, nb=nb: handle.write(nbformat.writes(nb)))
        written.append(path)
    return written


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a reproduction; carries the results so far (the rest marked "not run")."""

    def __init__(self, results: list[NotebookResult]):
        super().__init__("interrupted")
        self.results = results


def shipped_records_note(profile: str) -> str:
    """What the run will find in ``data/reference/<profile>/`` before it trains anything (the notebooks
    verify each record when they read it; this only counts, so the runner stays light)."""
    from .paths import reference_dir

    folder = reference_dir(Path(profile).stem)
    shipped = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not shipped:
        return f"profile {Path(profile).stem}: no shipped records in {folder}; runs without a record are trained"
    quiet = [stem for stem, section in (load_profile(profile).get("notebooks") or {}).items()
             if (section or {}).get("train_missing") is False]
    return (f"profile {Path(profile).stem}: using {len(shipped)} shipped records from {folder}"
            + (f"; {', '.join(quiet)} train nothing (train_missing: false)" if quiet else ""))


def summary(results: list[NotebookResult]) -> str:
    lines = [f"{'notebook':<28} {'status':<11} {'seconds':>8}"]
    lines += [f"{r.name:<28} {r.status:<11} {r.seconds:>8.1f}" for r in results]
    lines.append(f"{'total':<28} {'':<11} {sum(r.seconds for r in results):>8.1f}")
    failures = [r for r in results if r.status in ("FAILED", "INTERRUPTED")]
    if failures:
        lines.append("")
        for r in failures:
            where = (f"executed copy with the traceback: {r.output}" if r.status == "FAILED" and r.output
                     else f"partly executed copy: {r.output}" if r.output else "no executed copy was written")
            lines.append(f"{r.status} {r.name}: {r.error}\n       {where}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .cli import command_parser, user_errors

    # its --runs-dir is the parent of every profile's folder (the notebooks' DPEQ_RUNS_DIR), so not the shared one
    parser = command_parser("reproduce", __doc__.split("\n\n")[0], profile="smoke", runs_dir=False)
    parser.add_argument("--out", type=Path, default=None, help="folder for executed notebooks")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="parent folder for run records (default data/runs; sets DPEQ_RUNS_DIR for the notebooks)")
    parser.add_argument("--figures-dir", type=Path, default=None,
                        help="parent folder for figures (default figures; sets DPEQ_FIGURES_DIR for the notebooks)")
    parser.add_argument("--only", action="append", default=None, metavar="NN",
                        help="run only notebooks whose name starts with this (repeatable), e.g. --only 03")
    parser.add_argument("--list", action="store_true", help="list the notebooks and their parameters, run nothing")
    parser.add_argument("--student", action="store_true",
                        help="write the student edition (solution cells removed, no outputs) to --out (default "
                             "notebooks/student/); runs nothing")
    parser.add_argument("--notebooks-dir", type=Path, default=NOTEBOOKS_DIR, help=argparse.SUPPRESS)
    parser.add_argument("--cell-timeout", type=int, default=3600, help="seconds one cell may run (default 3600)")
    args = parser.parse_args(argv)
    try:
        notebooks = discover(args.notebooks_dir, args.only)
        load_profile(args.profile)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if args.list:
        import papermill

        for notebook in notebooks:
            params = papermill.inspect_notebook(str(notebook))
            print(notebook.stem)
            for key, spec in params.items():
                print(f"    {key} = {spec['default']}  # {spec['help']}")
        return 0
    if args.student:
        with user_errors(parser.prog, args.debug):
            written = student_edition(args.out or NOTEBOOKS_DIR / "student", args.notebooks_dir, args.only)
        print("\n".join(str(p) for p in written))
        print(f"student edition of {len(written)} notebook(s) written: no solution cells, no outputs")
        return 0
    for variable, folder in (("DPEQ_RUNS_DIR", args.runs_dir), ("DPEQ_FIGURES_DIR", args.figures_dir)):
        if folder is not None:
            os.environ[variable] = str(folder.expanduser().resolve())  # the kernels inherit it
    with user_errors(parser.prog, args.debug):
        try:
            results = run_notebooks(args.profile, args.out, args.only, args.notebooks_dir, args.cell_timeout)
        except Interrupted as interrupted:
            print()
            print(summary(interrupted.results))
            return 130
    print()
    print(summary(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
