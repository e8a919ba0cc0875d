"""One look for every figure, and one way to save it: ``figures/<profile>/<name>.{png,pdf}``."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from .paths import figures_dir, write_atomic

#: Colours per model family, fixed so every figure reads the same.
MODEL_COLOURS = {"eq_resnet9": "#1b7837", "resnet9": "#762a83", "resnet9_matched": "#af8dc3", "wrn16_4": "#e08214"}
#: Readable names for model keys (legends and tables).
MODEL_LABELS = {"eq_resnet9": "equivariant ResNet-9 (paper)", "resnet9": "ResNet-9 (same widths)",
                "resnet9_matched": "ResNet-9 (same #params)", "wrn16_4": "WRN-16-4 (GN+WS)"}
#: Readable names for every key a figure or table may show (models, the baselines of part E, the
#: variants and study labels): legends, ticks and tables use :func:`display_name`, never config keys.
DISPLAY_NAMES = {**MODEL_LABELS, "wrn40_4": "WRN-40-4 (GN+WS)", "de_et_al": "De et al. 2022 (WRN-16-4, GN+WS, augmult)",
                 "pruning_dropping": "pre-pruning + gradient dropping", "modelmix": "ModelMix",
                 "equivariant (this paper)": "equivariant ResNet-9 (paper)", "non_private": "non-private",
                 "eq_resnet9_small": "equivariant ResNet-9, half widths"}


def display_name(key: str) -> str:
    """The readable name of ``key`` (a model, a baseline, a study label); a label that starts with a
    known key keeps the rest ("de_et_al seed 1" → "De et al. 2022 (…), seed 1", "eq_resnet9 160 steps"
    → "equivariant ResNet-9 (paper), 160 steps"); an unknown key is returned as it is."""
    if key in DISPLAY_NAMES:
        return DISPLAY_NAMES[key]
    base, _, rest = key.partition(" ")
    return f"{DISPLAY_NAMES[base]}, {rest}" if rest and base in DISPLAY_NAMES else key


def set_theme() -> None:
    """The seaborn theme all notebooks use."""
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    matplotlib.rcParams.update({"figure.dpi": 100, "savefig.dpi": 150, "savefig.bbox": "tight",
                                "axes.titleweight": "bold"})


def notebook_header(profile: str, seed: int = 0) -> None:
    """What every notebook's set-up cell does: the theme, the environment (versions, device, commit),
    the seed (set) and the profile with its description."""
    from .profiles import load_profile
    from .runtime import environment_report, set_seed

    set_theme()
    for key, value in environment_report().items():
        print(f"{key:>12}: {value}")
    print(f"{'seed':>12}: {set_seed(seed)}")
    print(f"{'profile':>12}: {profile} - {load_profile(profile).get('description', '')}")


def savefig(fig, name: str, profile: str) -> list[Path]:
    """Write ``fig`` as PNG and PDF under ``figures/<profile>/``; returns the two paths. Each file is
    written atomically (:func:`dpeq_utils.paths.write_atomic`), so an interrupted save never leaves a
    truncated figure under the real name; the PDF carries no creation date, so the same figure gives
    the same bytes and a rebuilt figure shows in git only when it changed."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"figure name must be a plain file stem, got {name!r}")
    folder = figures_dir(profile)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.{ext}" for ext in ("png", "pdf")]
    for path in paths:
        fmt = path.suffix[1:]
        metadata = {"CreationDate": None} if fmt == "pdf" else None
        write_atomic(path, lambda handle: fig.savefig(handle, format=fmt, metadata=metadata), binary=True)
    return paths
