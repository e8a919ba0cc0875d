"""The code itself: lint-clean, and its modules import each other in one direction only."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dpeq_utils"


def test_mypy_passes_on_the_public_seams():
    """The modules ``[tool.mypy]`` in pyproject.toml names type-check."""
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_passes():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "dpeq_utils", "tests", "benchmarks"],
                            capture_output=True, text=True, cwd=PACKAGE.parent, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":`` — runs only when the module is the program, never on import."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _nodes(tree: ast.AST):
    """Every node of a module, including those inside functions, except ``__main__`` guards."""
    for node in ast.iter_child_nodes(tree):
        if _is_main_guard(node):
            continue
        yield node
        yield from _nodes(node)


def _imports(path: Path) -> set[str]:
    """dpeq_utils modules imported anywhere in a module, at its top or inside functions: a lazy import
    inside a function still runs whenever that function does, so it counts."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in _nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [f"{target}.{a.name}" for a in node.names]
            found |= {n for n in names if (PACKAGE.parent / (n.replace(".", "/") + ".py")).is_file()
                      or (PACKAGE.parent / n.replace(".", "/") / "__init__.py").is_file()} or {target}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dpeq_utils")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dpeq_utils"):
            found.add(node.module)
    return found - {module}


def test_module_imports_form_no_cycle():
    graph = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}
    visiting, done = set(), set()

    def visit(node, trail):
        if node in done:
            return
        assert node not in visiting, "import cycle: " + " -> ".join(trail + [node])
        visiting.add(node)
        for target in graph.get(node, ()):
            visit(target, trail + [node])
        visiting.discard(node)
        done.add(node)

    for name in graph:
        visit(name, [])
    assert "dpeq_utils.train" in graph and "dpeq_utils.config" in graph["dpeq_utils.train"]
    assert "dpeq_utils.train" in graph["dpeq_utils.runs"], "function-level imports are counted"
    assert not any("dpeq_utils.__main__" in targets for targets in graph.values()), "nothing imports the front door"


def test_long_modules_say_why_they_are_one_file():
    """A module over ~350 lines is split into rooms with one job each, or its docstring says why not."""
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        if lines > 360:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert "Why one file" in doc, f"{path.relative_to(PACKAGE.parent)} has {lines} lines and no reason"
