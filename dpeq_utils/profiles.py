"""Profiles (``notebooks/profiles/*.yaml``) read as plain data: nothing here imports torch, escnn or
opacus, so reading a profile (the papermill runner, ``--list``) stays light. Building a
:class:`~dpeq_utils.config.RunConfig` from a profile is :func:`dpeq_utils.config.config_from_profile`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .bounds import expansion_problem
from .paths import profiles_dir

PROFILES = ("smoke", "teach", "paper")


def profile_path(profile: str | Path) -> Path:
    """A profile by name (``smoke``, ``teach``, ``paper``) or by path to a YAML file."""
    path = Path(profile)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"no profile file at {path}")
        return path
    path = profiles_dir() / f"{profile}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in profiles_dir().glob("*.yaml"))
        raise ValueError(f"unknown profile {profile!r}; available: {available} (or give a path to a .yaml file)")
    return path


#: What a profile (or a ``--set`` value) may hold: the shipped ones hold a few hundred values in a
#: few kilobytes. Bigger files, and YAML whose aliases (``*name``) expand past this ("billion
#: laughs": 300 bytes that expand to gigabytes), are refused before anything uses them.
MAX_PROFILE_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 16


def bounded_yaml(text: str, where: str):
    """``yaml.safe_load(text)`` (plain data only, never Python objects), refused with one sentence
    naming ``where`` if its aliases expand it past :data:`MAX_YAML_VALUES` values or
    :data:`MAX_YAML_DEPTH` levels. Loading itself is linear: an alias is the same object again."""
    content = yaml.safe_load(text)
    problem = expansion_problem(content, MAX_YAML_VALUES, MAX_YAML_DEPTH)
    if problem:
        raise ValueError(f"{where} holds {problem} once its YAML aliases (*name) are expanded; a dpeq profile "
                         "holds a few hundred plain values: write them out")
    return content


def load_profile(profile: str | Path) -> dict:
    """The whole profile file as a dict (its ``run`` section feeds :func:`config_from_profile`)."""
    path = profile_path(profile)
    if path.stat().st_size > MAX_PROFILE_BYTES:
        raise ValueError(f"profile {path} is {path.stat().st_size:,} bytes; a dpeq profile is a few kilobytes "
                         f"(at most {MAX_PROFILE_BYTES:,}): is it the right file?")
    try:
        content = bounded_yaml(path.read_text(), f"profile {path}") or {}
    except yaml.YAMLError as err:
        raise ValueError(f"profile {path} is not valid YAML or holds more than plain data ({str(err).splitlines()[0]}); "
                         "fix the file (profiles are mappings of plain values)") from None
    except UnicodeDecodeError:
        raise ValueError(f"profile {path} is not text (UTF-8): is it the right file?") from None
    if not isinstance(content, dict) or not isinstance(content.get("run"), dict):
        raise ValueError(f"profile {path} must be a mapping with a 'run' section of RunConfig fields")
    return content


def baseline_entries(profile: str | Path) -> dict[str, dict]:
    """A profile's ``baselines`` section: named changes to its ``run`` section (De et al., pruning, ModelMix)."""
    entries = load_profile(profile).get("baselines") or {}
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise ValueError(f"profile {profile!r}: 'baselines' must map names to mappings of RunConfig fields")
    return entries


#: What "equal budget" holds fixed when baselines are compared with the profile's run.
BUDGET_FIELDS = ("dataset", "train_size", "test_size", "target_epsilon", "target_delta", "accountant", "batch_size",
                 "update_steps", "epochs", "seed")


def baseline_changes(profile: str | Path, names, equal_budget: bool = True) -> dict[str, dict]:
    """For each named baseline, its changes to the profile's run; with ``equal_budget`` the
    :data:`BUDGET_FIELDS` are dropped, so every method gets the run's data, ε, batch and steps.

    >>> baseline_changes("paper", ["de_et_al_eps8"])["de_et_al_eps8"]["model"]
    'wrn16_4'
    >>> "update_steps" in baseline_changes("paper", ["de_et_al_eps8"])["de_et_al_eps8"]
    False
    """
    entries = baseline_entries(profile)
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise ValueError(f"profile {profile!r} has no baseline(s) {unknown}; available: {sorted(entries)}")
    return {name: {k: v for k, v in entries[name].items() if not (equal_budget and k in BUDGET_FIELDS)}
            for name in names}


