"""Folders of the project, independent of the current working directory.

Every folder can be moved with an environment variable, so a notebook executed by papermill from
any directory, a test writing into a temporary folder, and a user with a shared dataset cache all
resolve the same names.

=====================  ===========================  ==========================
folder                 default                      override
=====================  ===========================  ==========================
data                   ``<repo>/data``              ``DPEQ_DATA_DIR``
dataset cache          ``<data>/cache``             ``DPEQ_CACHE_DIR``
run records            ``<data>/runs/<profile>``    ``DPEQ_RUNS_DIR`` (parent)
shipped records        ``<repo>/data/reference/``       ``DPEQ_REFERENCE_DIR`` (parent)
                       ``<profile>``
figures                ``<repo>/figures``           ``DPEQ_FIGURES_DIR``
profiles               ``<repo>/notebooks/profiles``
=====================  ===========================  ==========================
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _from_env(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else default


def data_dir() -> Path:
    return _from_env("DPEQ_DATA_DIR", REPO_ROOT / "data")


def cache_dir() -> Path:
    """Where downloaded datasets are kept (ignored by git)."""
    return _from_env("DPEQ_CACHE_DIR", data_dir() / "cache")


def runs_dir(profile: str | None = None) -> Path:
    """Run records; one sub-folder per profile."""
    root = _from_env("DPEQ_RUNS_DIR", data_dir() / "runs")
    return root / profile if profile else root


def reference_dir(profile: str | None = None) -> Path:
    """Run records shipped with the project (the reference studies); one sub-folder per profile.
    Part of the repository, so moving the data folder (``DPEQ_DATA_DIR``) does not hide them."""
    root = _from_env("DPEQ_REFERENCE_DIR", REPO_ROOT / "data" / "reference")
    return root / profile if profile else root


def figures_dir(profile: str | None = None) -> Path:
    root = _from_env("DPEQ_FIGURES_DIR", REPO_ROOT / "figures")
    return root / profile if profile else root


def profiles_dir() -> Path:
    return REPO_ROOT / "notebooks" / "profiles"


def write_atomic(path: Path, write: Callable, binary: bool = False, user_readable: bool = True) -> None:
    """Create ``path`` through ``write(handle)``: into a temporary file beside it, flushed to disk, then
    renamed into place, so a crash never leaves a half-written file under the real name and a failed
    ``write`` leaves nothing at all. ``user_readable``: give it the permissions the user's umask gives
    any new file (the temporary file is created 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("wb" if binary else "w", dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if user_readable:
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(handle.name, 0o666 & ~mask)
        os.replace(handle.name, path)
    except OSError as err:  # a full disk, a quota, a vanished folder: say which file, and that nothing is left
        raise type(err)(err.errno, f"could not write {path}: {err.strerror or err}; nothing was left there: free "
                        "space or choose another folder, then rerun") from err
    finally:
        Path(handle.name).unlink(missing_ok=True)
