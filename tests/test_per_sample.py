"""Per-example gradients (every engine) against the definition: one backward pass per example (float64)."""

import pytest
import torch
import torch.nn as nn
from conftest import relative_error

from dpeq_utils import per_sample
from dpeq_utils.data import augment_views
from dpeq_utils.models import build_model
from dpeq_utils.models.equivariant import StandardizedR2Conv
from dpeq_utils.per_sample import (
    ENGINE_FUNCTIONS,
    closed_form_pull_back,
    expansion_function,
    hooks_per_sample_grads,
    hooks_supported,
    naive_per_sample_grads,
    per_sample_grads,
    resolve_engine,
)
from dpeq_utils.runtime import conv_layout

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
    monkeypatch.setattr(per_sample.rules, "GROUPED_MIN_PIXELS", min_pixels)
    _check(build_model(name, widths=SMALL), "hooks")


@pytest.mark.parametrize("name", ["eq_resnet9", "wrn16_4"])
def test_closed_form_pull_back_equals_the_generic_one(name):
    """The closed-form chain rule through weight standardisation and the escnn basis expansion
    (:func:`closed_form_pull_back`) equals ``vmap`` of ``torch.func.vjp`` through ``expand_parameters``."""
    model = build_model(name, widths=SMALL).double()
    generator = torch.Generator().manual_seed(1)
    checked = 0
    for module in model.modules():
        if not hasattr(module, "expand_parameters"):
            continue
        function, params = expansion_function(module)
        outputs, pullback = torch.func.vjp(function, params)
        cotangents = {k: torch.randn(4, *v.shape, generator=generator, dtype=v.dtype) for k, v in outputs.items()}
        expected = torch.func.vmap(pullback)(cotangents)[0]
        fast = closed_form_pull_back(module, cotangents)
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
    monkeypatch.setattr(per_sample.pull_backs, "CACHE_SLICE_BYTES", 2 ** 30)
    whole = per_sample.standardize_pull_back(weight, grad, leading_dims)
    monkeypatch.setattr(per_sample.pull_backs, "CACHE_SLICE_BYTES", 1)
    sliced = per_sample.standardize_pull_back(weight, grad.clone(), leading_dims, inplace=True)
    assert relative_error(sliced, whole) <= 1e-14 and relative_error(whole, grad) > 0.1


@pytest.mark.parametrize("batch, fields_out, o, fields_in, r, n", [
    (1, 1, 1, 1, 1, 1), (3, 2, 4, 5, 7, 6), (16, 39, 4, 39, 72, 64), (8, 13, 8, 6, 72, 64)])
def test_basis_contraction_sums_each_field_pair_against_the_basis(batch, fields_out, o, fields_in, r, n):
    """In float32 on a CPU the contraction runs as a oneDNN convolution over the filter
    gradients' memory; it must equal the sum written out in float64 up to float32 rounding, and
    float64 (einsum) must equal it exactly up to summation order."""
    generator = torch.Generator().manual_seed(3)
    grads = torch.randn(batch, fields_out * o, fields_in * r, generator=generator, dtype=torch.float64)
    basis = torch.randn(n, o, r, generator=generator, dtype=torch.float64)
    expected = (grads.view(batch, fields_out, o, fields_in, 1, r) * basis.permute(1, 2, 0).reshape(1, 1, o, 1, r, n)
                .transpose(4, 5)).sum((2, 5))  # (B, x, y, n)
    exact = per_sample.basis_contraction(grads, basis, fields_out)
    single = per_sample.basis_contraction(grads.float(), basis.float(), fields_out)
    assert exact.shape == single.shape == (batch, fields_out, fields_in, n)
    assert relative_error(exact, expected) <= 1e-13
    assert single.dtype == torch.float32 and relative_error(single.double(), expected) <= 1e-5


def test_float32_layer_gradients_match_float64():
    """The engine's float32 arithmetic (grouped and unfold filter gradients, oneDNN basis contraction,
    standardisation pull-back) against float64, layer by layer on the same inputs and output gradients.

    Layer by layer, not through the whole model: the model's float32 activation gradients may differ
    from float64 by ~1e-3 wherever a field's two largest channels are within rounding of each other
    (the invariant max pool's gradient goes to the argmax; measured: 3 of 40 inits, a gap of 8e-8), which
    is a property of max, not of the engine."""
    torch.manual_seed(5)
    model = build_model("eq_resnet9", widths=SMALL).train()
    shapes = {}
    handles = [module.register_forward_hook(lambda module, inputs, output: shapes.__setitem__(
        module, (inputs[0].tensor.shape, output.tensor.shape))) for module in model.modules() if isinstance(module, StandardizedR2Conv)]
    model(torch.randn(2, 3, 32, 32))
    for handle in handles:
        handle.remove()
    batch, views = 3, 2
    checked_maps = set()
    for module, (in_shape, out_shape) in shapes.items():
        x = torch.randn(batch * views, *in_shape[1:], dtype=torch.float64)
        grad_out = torch.randn(batch * views, *out_shape[1:], dtype=torch.float64)
        single = per_sample.pull_back_to_parameters(module, per_sample.conv_rule(
            module, conv_layout(x.float()), conv_layout(grad_out.float()), batch))
        double = per_sample.pull_back_to_parameters(module.double(), per_sample.conv_rule(module, x, grad_out, batch))
        module.float()
        for name in double:
            assert single[name].dtype == torch.float32
            assert relative_error(single[name].double(), double[name]) <= 1e-5, (out_shape, name)
        checked_maps.add(out_shape[-1] * out_shape[-2] >= per_sample.GROUPED_MIN_PIXELS)
    assert checked_maps == {True, False}  # both filter-gradient methods
