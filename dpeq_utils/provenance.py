"""Which code produced a run: read once, when ``dpeq_utils`` is imported.

A record used to name the checkout's commit at the time it was written. A long process (a study, a
notebook kernel) that had loaded older code then named a later commit, and a run resumed after an
edit named neither. So the package's identity is read **at import**, before any edit can slip in:

- ``git_commit``: the checkout's commit then, with ``+dirty`` if tracked files differed from it;
- ``source_sha256``: SHA-256 of every ``dpeq_utils/**/*.py`` file as it was on disk then (paths and
  bytes, in sorted order). Two processes with the same hash run the same package code, whatever git
  says, and a ``+dirty`` commit is pinned down by this hash.

Every run record carries both; a checkpoint carries the hash, and continuing a run under other code
needs the user's explicit consent (:mod:`dpeq_utils.checkpoint`), after which the record lists every
code version the run was trained under (``code_history``).

Modules imported lazily inside functions are read from disk when first used; editing the package
while a long process runs can still mix code. Run long studies from a checkout nobody edits (e.g. a
``git worktree``).
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def source_sha256(package_dir: Path = PACKAGE_DIR) -> str:
    """SHA-256 over the relative paths and bytes of the package's Python files."""
    digest = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(package_dir).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def checkout_commit(folder: Path = PACKAGE_DIR.parent) -> str | None:
    """The checkout's commit (``+dirty`` with uncommitted changes to tracked files), or None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


#: The code this process runs, as read when dpeq_utils was imported.
CODE = {"git_commit": checkout_commit(), "source_sha256": source_sha256()}
