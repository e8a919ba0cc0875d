"""Published numbers and the paper's claims, read from ``docs/fidelity.md``: the one place they are
written down, each with its source. Nothing here is typed from memory, and no number of the
paper's is a literal in code (a test checks that the tables parse and that the report prints them)."""

from __future__ import annotations

import functools
import re

from .paths import REPO_ROOT

FIDELITY = REPO_ROOT / "docs" / "fidelity.md"


def _table(marker: str) -> list[dict[str, str]]:
    """The markdown table right after ``<!-- marker: ... -->`` in docs/fidelity.md, as rows of strings."""
    text = FIDELITY.read_text()
    found = re.search(rf"<!-- {re.escape(marker)}:.*?-->\n((?:\|.*\|\n)+)", text)
    if not found:
        raise ValueError(f"{FIDELITY} has no table marked '{marker}'")
    lines = [line.strip().strip("|").split("|") for line in found.group(1).strip().splitlines()]
    header = [cell.strip() for cell in lines[0]]
    return [dict(zip(header, (cell.strip() for cell in row), strict=True)) for row in lines[2:]]


def _number(text: str) -> float:
    """'82.5 %' → 82.5, '≈ 47' → 47.0."""
    return float(re.sub(r"[^0-9.]", "", text))


@functools.cache
def published_cifar10() -> list[tuple[str, str, float, float]]:
    """(source, model, ε, test accuracy) of each published CIFAR-10 result dpeq shows."""
    return [(row["source"], row["model"], _number(row["ε"]), _number(row["test accuracy"]) / 100)
            for row in _table("published-cifar10")]


@functools.cache
def paper_claims() -> dict[str, dict]:
    """The paper's claims by key (accuracy, parameters, compute): ``{"claim": its wording, "value": the
    number in it, "source": where it is stated}``."""
    return {row["key"]: {"claim": row["claim"], "value": _number(row["value"]), "source": row["source"]}
            for row in _table("paper-claims")}


def published_table():
    import pandas as pd

    return pd.DataFrame(published_cifar10(), columns=["source", "model", "epsilon", "test_accuracy"])


#: ModelMix's shipped CIFAR-10 run (Xiao et al. 2022, code junwan0224/ModelMix), reported there as
#: ε = 8 under their own accountant: noise multiplier, sample rate, steps, δ (docs/fidelity.md).
MODELMIX_SHIPPED = {"noise_multiplier": 0.33, "sample_rate": 0.03, "steps": 3400, "target_delta": 1e-5}
#: The public ε = 8 reproduction of De et al. 2022 (facebookresearch/tan): σ = 3, batch 4096 of
#: 50,000, 2,500 steps, δ = 1e-5 (docs/fidelity.md).
DE_ET_AL_EPS8 = {"noise_multiplier": 3.0, "sample_rate": 4096 / 50_000, "steps": 2500, "target_delta": 1e-5}
