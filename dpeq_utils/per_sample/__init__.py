"""Per-example gradients: two engines with one interface, and the naive loop they are tested against.

* ``"vmap"`` — whole-model ``torch.func`` (``vmap`` of ``grad``): works for any model, the reference.
  escnn modules take ``GeometricTensor`` inputs and keep their kernel bases as buffers, so Opacus's
  per-layer hooks do not apply to them (``docs/fidelity.md``); ``torch.func`` differentiates the whole forward
  function instead, once per example, vectorised by ``vmap``. It needs the escnn fixes applied when
  :mod:`dpeq_utils.equivariance` is imported.
* ``"hooks"`` — one ordinary batched backward pass for the activations only, then per-layer rules
  (:func:`hooks_per_sample_grads`). A steerable conv's filter is a function of its basis coefficients
  (linear, after the weight standardisation), so its per-example coefficient gradients are the
  transposed Jacobian of that function applied to per-example *filter* gradients: on large maps one
  grouped convolution backward whose groups are the examples, on small maps what Opacus computes
  for ``nn.Conv2d`` (unfold + batched matmul); see :func:`conv_rule`. ``vmap`` instead makes a
  grouped convolution of every weight gradient over the whole batch of views, slow on a CPU.

:data:`ENGINES` lists the engines, :func:`per_sample_grads` dispatches, ``"auto"`` picks ``hooks``
when every trainable layer of the model has a rule and ``vmap`` otherwise.

An *example* here is one training image with its ``K`` augmentation views: its gradient is the
gradient of the mean loss over its views (De et al. 2022's augmentation multiplicity), so the
views are averaged *before* clipping and still count as one example for privacy.

The package is shaped like Opacus's ``grad_sample``: :mod:`.rules` (per-layer rules, by layer type),
:mod:`.pull_backs` (from a layer's effective filter to its parameters), :mod:`.engines` (the hooks
engine and the dispatch) and :mod:`.functional` (the ``vmap`` engine and the naive loop). escnn
internals are read only through :mod:`dpeq_utils.escnn_compat`.
"""

from .engines import (  # noqa: F401
    ENGINE_FUNCTIONS,
    ENGINES,
    capture_layer_io,
    hooks_per_sample_grads,
    hooks_supported,
    per_sample_grads,
    resolve_engine,
)
from .functional import example_loss, naive_per_sample_grads, vmap_per_sample_grads  # noqa: F401
from .pull_backs import (  # noqa: F401
    CACHE_SLICE_BYTES,
    PULL_BACKS,
    basis_contraction,
    closed_form_pull_back,
    expansion_function,
    pull_back_to_parameters,
    register_pull_back,
    standardize_pull_back,
)
from .rules import (  # noqa: F401
    GRAD_RULES,
    GROUPED_MIN_PIXELS,
    conv_rule,
    filter_grads_method,
    grouped_filter_grads,
    kernel_size,
    register_grad_rule,
    unfold_filter_grads,
)
