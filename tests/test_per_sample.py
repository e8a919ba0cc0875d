"""Per-example gradients (every engine) against the definition: one backward pass per example (float64)."""

import pytest
import torch
import torch.nn as nn
from conftest import relative_error

from dpeq_utils import per_sample
from dpeq_utils.data import augment_views
from dpeq_utils.models import build_model
from dpeq_utils.per_sample import (
    ENGINE_FUNCTIONS,
    _conv_parameters,
    _fast_pull_back,
    hooks_per_sample_grads,
    hooks_supported,
    naive_per_sample_grads,
    per_sample_grads,
    resolve_engine,
)

SMALL = (8, 16, 16)


def _inputs(batch=3, views=2):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    return augment_views(images, views, generator), labels


ENGINES = sorted(ENGINE_FUNCTIONS)


def _check(model, engine):
    model = model.double().train()
    views, labels = _inputs()
    fast, losses = per_sample_grads(model, views, labels, engine)
    slow = naive_per_sample_grads(model, views, labels)
    assert fast.keys() == slow.keys() and len(fast) > 0
    for name in slow:
        assert fast[name].shape == (3, *dict(model.named_parameters())[name].shape)
        assert relative_error(fast[name], slow[name]) <= 1e-8, name
    # examples really differ (the check is not satisfied by a broadcast batch gradient)
    flat = torch.cat([g.flatten(1) for g in fast.values()], 1)
    assert relative_error(flat[0], flat[1]) > 1e-3
    assert losses.shape == (3,)
    with torch.no_grad():
        expected_losses = torch.nn.functional.cross_entropy(
            model(views.flatten(0, 1)), labels.repeat_interleave(views.shape[1]), reduction="none").view(3, -1).mean(1)
    assert relative_error(losses, expected_losses) <= 1e-10


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("group,restrict", [("C1", False), ("C2", True), ("C4", True), ("C8", False), ("C16", False),
                                            ("D1", True), ("D2", True), ("D4", True), ("D4", False), ("D8", False)])
def test_equivariant_resnet9(group, restrict, engine):
    _check(build_model("eq_resnet9", group=group, restrict=restrict, widths=SMALL), engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_equivariant_resnet9_global_head(engine):
    _check(build_model("eq_resnet9", group="C4", restrict=False, widths=SMALL, head="global"), engine)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["resnet9", "resnet9_matched"])
def test_plain_resnet9_baselines(name, engine):
    _check(build_model(name, widths=SMALL), engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_wrn16_4(engine):
    _check(build_model("wrn16_4"), engine)


@pytest.mark.parametrize("min_pixels", [0, 10 ** 9], ids=["grouped", "unfold"])
@pytest.mark.parametrize("name", ["eq_resnet9", "wrn16_4"])
def test_both_convolution_methods_are_exact(name, min_pixels, monkeypatch):
    """Every convolution through one method: the grouped backward (strided and 1x1 convolutions
    included, in WRN-16-4) and unfold + matmul, with two views per example, against the naive loop."""
    monkeypatch.setattr(per_sample, "GROUPED_MIN_PIXELS", min_pixels)
    _check(build_model(name, widths=SMALL), "hooks")


@pytest.mark.parametrize("name", ["eq_resnet9", "wrn16_4"])
def test_closed_form_pull_back_equals_the_generic_one(name):
    """The closed-form chain rule through weight standardisation and the escnn basis expansion
    (:func:`_fast_pull_back`) equals ``vmap`` of ``torch.func.vjp`` through ``expand_parameters``."""
    model = build_model(name, widths=SMALL).double()
    generator = torch.Generator().manual_seed(1)
    checked = 0
    for module in model.modules():
        if not hasattr(module, "expand_parameters"):
            continue
        function, params = _conv_parameters(module)
        outputs, pullback = torch.func.vjp(function, params)
        cotangents = {k: torch.randn(4, *v.shape, generator=generator, dtype=v.dtype) for k, v in outputs.items()}
        expected = torch.func.vmap(pullback)(cotangents)[0]
        fast = _fast_pull_back(module, cotangents)
        assert fast is not None and fast.keys() == expected.keys()
        for key in expected:
            assert relative_error(fast[key], expected[key]) <= 1e-12, (type(module).__name__, key)
        checked += 1
    assert checked >= 8


def test_auto_engine_is_hooks_for_every_dpeq_model():
    for name in ("eq_resnet9", "resnet9", "resnet9_matched", "wrn16_4"):
        assert resolve_engine("auto", build_model(name, widths=SMALL)) == "hooks", name


class _ScaledModel(nn.Module):
    """A layer the hooks engine has no rule for (a bare parameter outside any known layer)."""

    def __init__(self):
        super().__init__()
        self.inner = build_model("resnet9", widths=(4, 8, 8))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.inner(x) * self.scale


def test_unsupported_layer_falls_back_to_vmap_and_hooks_says_why():
    model = _ScaledModel().double().train()
    assert not hooks_supported(model) and resolve_engine("auto", model) == "vmap"
    views, labels = _inputs()
    with pytest.raises(NotImplementedError, match="no per-example rule for model .*_ScaledModel.*vmap"):
        hooks_per_sample_grads(model, views, labels)
    grads, _ = per_sample_grads(model, views, labels, "auto")
    slow = naive_per_sample_grads(model, views, labels)
    assert relative_error(grads["scale"], slow["scale"]) <= 1e-8


class _SharedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3 * 32 * 32, 3 * 32 * 32)
        self.head = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.head(self.linear(self.linear(x)))


def test_hooks_engine_refuses_shared_weights():
    views, labels = _inputs(batch=2, views=1)
    with pytest.raises(RuntimeError, match="ran twice.*vmap"):
        hooks_per_sample_grads(_SharedLayer().double(), views, labels)


def test_hooks_engine_leaves_the_model_as_it_found_it():
    model = build_model("eq_resnet9", widths=SMALL).double().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hooks_per_sample_grads(model, *_inputs())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="one of"):
        resolve_engine("opacus", build_model("resnet9", widths=SMALL))


@pytest.mark.parametrize("engine", ENGINES)
def test_views_are_averaged_per_example(engine):
    """An example's gradient with K views is the mean of its single-view gradients."""
    model = build_model("eq_resnet9", widths=SMALL).double().train()
    views, labels = _inputs(batch=2, views=3)
    together, _ = per_sample_grads(model, views, labels, engine)
    singles = [per_sample_grads(model, views[:, k:k + 1], labels, engine)[0] for k in range(3)]
    for name, grad in together.items():
        assert relative_error(grad, sum(s[name] for s in singles) / 3) <= 1e-10


@pytest.mark.parametrize("engine", ENGINES)
def test_rejects_unbatched_views(engine):
    model = build_model("resnet9", widths=SMALL)
    with pytest.raises(ValueError, match=r"\(B, K, C, H, W\)"):
        per_sample_grads(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), engine)


@pytest.mark.parametrize("leading_dims", [0, 1])
def test_standardisation_pull_back_in_slices_equals_one_piece(leading_dims, monkeypatch):
    """The pull-back runs on slices of examples to stay in cache: one example per slice gives the
    same numbers as the whole batch in one slice (up to the rounding of the matrix-vector products,
    whose blocking depends on the slice)."""
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(6, 4, 3, 3, generator=generator, dtype=torch.float64)
    grad = torch.randn(5, 6, 4, 3, 3, generator=generator, dtype=torch.float64)
    monkeypatch.setattr(per_sample, "CACHE_SLICE_BYTES", 2 ** 30)
    whole = per_sample.standardize_pull_back(weight, grad, leading_dims)
    monkeypatch.setattr(per_sample, "CACHE_SLICE_BYTES", 1)
    sliced = per_sample.standardize_pull_back(weight, grad.clone(), leading_dims, inplace=True)
    assert relative_error(sliced, whole) <= 1e-14 and relative_error(whole, grad) > 0.1


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 3, 5), (300, 576, 64), (64, 2808, 17)])
def test_rows_matmul_is_the_matrix_product(shape):
    """In float32 on a CPU the product runs as oneDNN's 1x1 convolution; it must equal the product
    computed in float64 up to float32 rounding, and keep its (M, N) row-major result."""
    m, k, n = shape
    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(m, k, generator=generator)
    matrix = torch.randn(k, n, generator=generator)
    product = per_sample.rows_matmul(rows, matrix)
    assert product.shape == (m, n) and product.dtype == torch.float32 and product.is_contiguous()
    assert relative_error(product.double(), rows.double() @ matrix.double()) <= 1e-5
    transposed = per_sample.rows_matmul(rows.t().contiguous().t(), matrix)  # column-major input: copied first
    assert relative_error(transposed, product) <= 1e-6


def test_float32_coefficient_gradients_match_float64():
    """The engine's float32 path (oneDNN basis products, grouped and unfold filter gradients) against
    the same model's float64 per-example gradients (the exact path the other tests check)."""
    model = build_model("eq_resnet9", widths=SMALL).train()
    views, labels = _inputs(batch=4)
    single, _ = hooks_per_sample_grads(model, views.float(), labels)
    double, _ = hooks_per_sample_grads(model.double(), views, labels)
    for name in double:
        assert relative_error(single[name].double(), double[name]) <= 1e-4, name
