"""Everything dpeq needs from escnn beyond its public API, in one place, checked against the one
escnn version it was written for (``escnn==1.0.11``, pinned in ``pyproject.toml``).

* :func:`apply_torch_func_fixes` — escnn's basis-expansion modules hash their tensor *contents*;
  inside ``vmap`` those tensors have no storage, and ``Module.named_modules`` hashes every module.
  They get ``torch.nn.Module``'s identity hash instead (applied on import of
  :mod:`dpeq_utils.equivariance`).
* :func:`single_block_basis` — the sampled basis and output-field count of a basis expansion with
  one block, read from escnn's private attributes (``_n_pairs``, ``_representations_pairs``,
  ``_escape_pair``, ``_out_count``): the hooks engine's closed-form pull-back needs them.

Another escnn version gets a warning on import: these reads may then fail or mean something else,
and the float64 tests against the naive per-example loop (``tests/test_per_sample.py``) say which.
This module imports only escnn and torch, so any dpeq module may use it.
"""

from __future__ import annotations

import warnings

import escnn
import torch
from escnn.nn.modules.basismanager import basisexpansion_blocks, basisexpansion_singleblock

TESTED_ESCNN = "1.0.11"

if getattr(escnn, "__version__", None) != TESTED_ESCNN:
    warnings.warn(f"dpeq was written and tested against escnn {TESTED_ESCNN}, this is "
                  f"{getattr(escnn, '__version__', 'unknown')}: dpeq reads a few escnn internals "
                  "(dpeq_utils/escnn_compat.py); run the test suite before trusting per-example gradients",
                  stacklevel=2)


def apply_torch_func_fixes() -> None:
    for cls in (basisexpansion_blocks.BlocksBasisExpansion, basisexpansion_singleblock.SingleBlockBasisExpansion):
        cls.__hash__ = torch.nn.Module.__hash__


def single_block_basis(expansion) -> tuple[torch.Tensor, int] | None:
    """``(sampled basis (n, o, i, *k), number of output fields)`` of an escnn basis expansion with one
    block (one input and one output field type, as in every dpeq model), or None for any other."""
    if getattr(expansion, "_n_pairs", None) != 1:
        return None
    pair = expansion._representations_pairs[0]
    basis = getattr(expansion, f"block_expansion_{expansion._escape_pair(pair)}").sampled_basis
    return basis, expansion._out_count[pair[1]]
