"""The records shipped with dpeq (``data/reference/``) are evidence: read-only unless asked, and
checked against a committed manifest whenever they are read.

- **Writing** a run, audit or mechanism record into a reference folder needs ``write_reference=True``
  (``--write-reference`` on the command lines): without it, ``train --runs-dir data/reference/teach
  --force`` would silently replace a shipped result. Extending the shipped study on purpose (``study
  run --runs-dir data/reference/teach --write-reference``) updates the manifest with each record.
- **Reading**: ``data/reference/MANIFEST.json`` lists the SHA-256 of every shipped file (run, audit
  and mechanism records, the compute record). A file in the repository's reference folder that is missing from the manifest
  or differs from it is refused with a message; ``tests/test_shipped.py`` checks the manifest
  against the folder. A record's own ``digest`` catches casual edits; the manifest is what makes an
  edit with a recomputed digest visible (it lives in git, beside the code that reads it).

A reference folder elsewhere (``DPEQ_REFERENCE_DIR``, e.g. a test's or a lab's own) is checked
against its own ``MANIFEST.json`` if it has one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from .errors import DpeqError
from .paths import REPO_ROOT, reference_dir, write_atomic

MANIFEST = "MANIFEST.json"
REPOSITORY_REFERENCE = REPO_ROOT / "data" / "reference"


class ShippedRecordError(DpeqError, ValueError):
    """Shipped evidence that would be overwritten, or that does not match the committed manifest."""


def _roots() -> list[Path]:
    return list(dict.fromkeys(p.resolve() for p in (REPOSITORY_REFERENCE, reference_dir())))


def reference_root_of(path: str | os.PathLike) -> Path | None:
    """The reference folder that ``path`` (a file or folder) lies in, if any."""
    resolved = Path(path).resolve()
    for root in _roots():
        if resolved == root or root in resolved.parents:
            return root
    return None


def guard_write(folder: str | os.PathLike, write_reference: bool) -> None:
    """Refuse to write into a reference folder unless asked to."""
    if not write_reference and reference_root_of(folder) is not None:
        raise ShippedRecordError(
            f"{folder} holds the records shipped with dpeq: writing there would replace shipped evidence. "
            "Write your runs to your own folder (the default data/runs/<profile>, or --runs-dir elsewhere); to "
            "extend the shipped study on purpose, pass --write-reference (write_reference=True)")


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


_MANIFESTS: dict[Path, tuple[float, dict[str, str]]] = {}  # parsed once per change, not once per record read


def _manifest(root: Path) -> dict[str, str] | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    mtime = path.stat().st_mtime_ns
    cached = _MANIFESTS.get(path)
    if cached is not None and cached[0] == mtime:
        return dict(cached[1])
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise ShippedRecordError(f"{path} is not a readable manifest ({err}); restore it from git") from err
    _MANIFESTS[path] = (mtime, files)
    return dict(files)


def verify_shipped(path: str | os.PathLike) -> None:
    """If ``path`` is a shipped file, check it against its reference folder's manifest."""
    root = reference_root_of(path)
    if root is None:
        return
    manifest = _manifest(root)
    if manifest is None:
        if root == REPOSITORY_REFERENCE.resolve():
            raise ShippedRecordError(f"{root / MANIFEST} is missing: the shipped records cannot be checked; "
                                     "restore it from git")
        return
    relative = Path(path).resolve().relative_to(root).as_posix()
    expected = manifest.get(relative)
    if expected is None:
        raise ShippedRecordError(f"{path} is not one of the shipped records (not in {root / MANIFEST}); move it to "
                                 "your own runs folder (data/runs/<profile>)")
    if file_sha256(Path(path)) != expected:
        raise ShippedRecordError(f"{path} differs from the shipped record (its SHA-256 is not the one in "
                                 f"{root / MANIFEST}); restore it with git checkout, or move your version to your "
                                 "own runs folder")


def shipped_files(root: Path) -> list[Path]:
    """Every record a reference folder ships (every JSON file but the manifest)."""
    return sorted(p for p in root.rglob("*.json") if p.name != MANIFEST and not p.name.startswith("."))


def _write_manifest(root: Path, files: dict[str, str]) -> Path:
    content = {"about": "SHA-256 of every record shipped in this folder; dpeq refuses a shipped record that "
                        "differs (dpeq_utils/shipped.py). Rewrite with: python -m dpeq_utils manifest",
               "files": dict(sorted(files.items()))}
    write_atomic(root / MANIFEST, lambda handle: handle.write(json.dumps(content, indent=1) + "\n"))
    return root / MANIFEST


def write_manifest(root: str | os.PathLike | None = None) -> Path:
    """(Re)write ``MANIFEST.json`` from the files a reference folder holds now."""
    root = Path(root) if root is not None else reference_dir()
    return _write_manifest(root, {p.relative_to(root).as_posix(): file_sha256(p) for p in shipped_files(root)})


def record_written(path: Path) -> None:
    """After a record was written into a reference folder (with ``write_reference``): add it to the manifest."""
    root = reference_root_of(path)
    if root is not None:
        files = _manifest(root) or {}
        files[Path(path).resolve().relative_to(root).as_posix()] = file_sha256(path)
        _write_manifest(root, files)


def main(argv: list[str] | None = None) -> int:
    """``python -m dpeq_utils manifest``: rewrite the manifest of the shipped records."""
    from .cli import command_parser, user_errors

    parser = command_parser("manifest", "Rewrite data/reference/MANIFEST.json (SHA-256 of every shipped run and "
                            "audit record) after adding shipped records on purpose.")
    args = parser.parse_args(argv)
    with user_errors(parser.prog, args.debug):
        print(write_manifest())
    return 0


if __name__ == "__main__":
    sys.exit(main())
