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

- **Links**: a shipped file is a plain file inside its reference folder. A symbolic link there (to
  a file or a folder), or a name that leads outside the folder, is refused on read, whatever it
  points at: the manifest vouches for files in the folder, not for what a link names.
- **Rewriting the manifest** (``python -m dpeq_utils manifest``) lists every entry that would be
  added, changed or removed and writes nothing unless ``--accept`` is given: an edited record is
  never blessed silently.

A reference folder elsewhere (``DPEQ_REFERENCE_DIR``, e.g. a test's or a lab's own) is checked the
same way, against its own ``MANIFEST.json``; a folder without one is refused (make one, after
checking its records, with ``DPEQ_REFERENCE_DIR=<folder> python -m dpeq_utils manifest --accept``).
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


def _named_inside(path: str | os.PathLike) -> tuple[Path, Path] | None:
    """``(root, the part of path below it)`` if ``path`` is *named* inside a reference folder (its
    absolute name, ``..`` resolved by name, passes through a folder that is a reference root),
    whatever its last components are (links included)."""
    named = Path(os.path.abspath(path))
    roots = _roots()
    for ancestor in (named, *named.parents):
        try:
            resolved = ancestor.resolve()
        except OSError:
            continue
        if resolved in roots:
            return resolved, named.relative_to(ancestor)
    return None


def reference_root_of(path: str | os.PathLike) -> Path | None:
    """The reference folder that ``path`` (a file or folder) lies in, if any: where it is named (a link
    inside the folder counts as inside) or where it resolves to (a link elsewhere to a shipped file)."""
    named = _named_inside(path)
    if named is not None:
        return named[0]
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
    """If ``path`` is a shipped file, check it against its reference folder's manifest. A file named
    inside a reference folder must be a plain file there: a symbolic link on the way (to a file or a
    folder, inside or out) is refused, so a link cannot stand in for an edited copy."""
    named = _named_inside(path)
    if named is not None:
        root, below = named
        current = root
        for part in below.parts:
            current = current / part
            if current.is_symlink():
                raise ShippedRecordError(
                    f"{path} is reached through a symbolic link ({current} -> {os.readlink(current)}): the records "
                    f"shipped in {root} are plain files and links there are refused; restore them with git checkout "
                    "(data/reference/), or copy what the link names to your own runs folder")
        relative = below.as_posix()
    else:
        resolved_root = reference_root_of(path)
        if resolved_root is None:
            return
        root, relative = resolved_root, Path(path).resolve().relative_to(resolved_root).as_posix()
    manifest = _manifest(root)
    if manifest is None:
        if root == REPOSITORY_REFERENCE.resolve():
            raise ShippedRecordError(f"{root / MANIFEST} is missing: the shipped records cannot be checked; "
                                     "restore it from git")
        raise ShippedRecordError(f"{path} is in {root} (DPEQ_REFERENCE_DIR), which has no {MANIFEST}: its records "
                                 "cannot be checked. Check them, then write one with DPEQ_REFERENCE_DIR="
                                 f"{root} python -m dpeq_utils manifest --accept; or unset DPEQ_REFERENCE_DIR")
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


def manifest_changes(root: str | os.PathLike | None = None) -> tuple[Path, dict[str, str], list[str]]:
    """What the manifest of a reference folder would become from the files it holds now: ``(root, new
    entries, one line per entry added, changed or removed)``. A symbolic link among them is refused."""
    root = Path(root) if root is not None else reference_dir()
    links = [p for p in root.rglob("*") if p.is_symlink()]
    if links:
        raise ShippedRecordError(f"{links[0]} is a symbolic link: a reference folder holds plain files only; replace "
                                 f"it with the file itself (or restore it with git checkout) before writing the manifest")
    files = {p.relative_to(root).as_posix(): file_sha256(p) for p in shipped_files(root)}
    old = (_manifest(root) if (root / MANIFEST).is_file() else None) or {}
    lines = ([f"  added    {name}" for name in sorted(set(files) - set(old))]
             + [f"  changed  {name}" for name in sorted(set(files) & set(old)) if files[name] != old[name]]
             + [f"  removed  {name}" for name in sorted(set(old) - set(files))])
    return root, files, lines


def write_manifest(root: str | os.PathLike | None = None, accept: bool = False) -> Path:
    """(Re)write ``MANIFEST.json`` from the files a reference folder holds now; if any entry would be
    added, changed or removed, only with ``accept`` (else :class:`ShippedRecordError` lists them)."""
    root, files, lines = manifest_changes(root)
    if lines and not accept:
        raise ShippedRecordError(f"{len(lines)} entries of {root / MANIFEST} would change:\n" + "\n".join(lines)
                                 + "\nCheck why (git diff, git status) and rerun with --accept to record them")
    return _write_manifest(root, files)


def record_written(path: Path) -> None:
    """After a record was written into a reference folder (with ``write_reference``): add it to the manifest."""
    root = reference_root_of(path)
    if root is not None:
        files = _manifest(root) or {}
        files[Path(path).resolve().relative_to(root).as_posix()] = file_sha256(path)
        _write_manifest(root, files)


def main(argv: list[str] | None = None) -> int:
    """``python -m dpeq_utils manifest``: compare the manifest of the shipped records with the files;
    with ``--accept``, rewrite it."""
    from .cli import command_parser, user_errors

    parser = command_parser("manifest", "Compare data/reference/MANIFEST.json (SHA-256 of every shipped run and audit "
                            "record) with the files; list every entry that would be added, changed or removed, and "
                            "rewrite it only with --accept (after adding shipped records on purpose).")
    parser.add_argument("--accept", action="store_true", help="write the manifest with the changes listed")
    args = parser.parse_args(argv)
    with user_errors(parser.prog, args.debug):
        root, _, lines = manifest_changes()
        if not lines:
            print(f"{root / MANIFEST} matches the {len(_manifest(root) or {})} files it lists; nothing to write")
            return 0
        path = write_manifest(accept=args.accept)
        print("\n".join(lines))
        print(f"wrote {path} ({len(lines)} entries added, changed or removed, as accepted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
