import warnings

import pytest
import torch
import torch.nn as nn
from escnn import nn as enn

from dpeq_utils.equivariance import (
    GROUPS,
    feature_equivariance_errors,
    group_order,
    halved_subgroup,
    invariance_error,
    parse_group,
    rotation_error_curve,
)
from dpeq_utils.models import MODELS, PlainResNet9, build_model, count_params, fields_for_width, same_width_channels

SMALL = (8, 16, 16)


def _x(n=2, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_width_rule_matches_the_official_field_counts():
    model = build_model("eq_resnet9", group="D4", restrict=True, widths=(16, 32, 64))
    assert model.num_fields == (6, 13, 39)
    assert model.classifier.in_features == 156  # 39 fields · 2×2 after group pooling


def test_paper_model_parameter_count_is_near_the_hand_derived_256k():
    assert 250_000 <= count_params(build_model("eq_resnet9")) <= 262_000


def test_width_rule_keeps_the_budget_comparable_across_groups():
    counts = {g: count_params(build_model("eq_resnet9", group=g, restrict=False)) for g in ("C1", "C4", "D4", "C8")}
    assert max(counts.values()) / min(counts.values()) < 1.25, counts


def test_matched_baseline_matches_parameters_and_same_width_baseline_matches_activations():
    eq = build_model("eq_resnet9", widths=SMALL)
    matched = build_model("resnet9_matched", widths=SMALL)
    assert abs(count_params(matched) - count_params(eq)) / count_params(eq) < 0.03
    same = build_model("resnet9", widths=SMALL)
    assert count_params(same) > 3 * count_params(eq), "equivariance saves parameters at equal width"
    feats = eq.feature_maps(_x())
    x = same.conv2(same.conv1(_x()))
    assert x.shape == feats["stage1"].tensor.shape
    assert same.conv3(same.norm1(same.res1(x) + x)).shape == feats["stage2"].tensor.shape


def test_wrn16_4_shape_and_size():
    model = build_model("wrn16_4")
    assert 2_700_000 < count_params(model) < 2_800_000  # WRN-16-4 has ~2.75M parameters
    assert model(_x()).shape == (2, 10)


@pytest.mark.parametrize("name", MODELS)
def test_no_batch_statistics_anywhere(name):
    model = build_model(name, widths=SMALL) if name != "wrn16_4" else build_model(name)
    for module in model.modules():
        assert not isinstance(module, nn.modules.batchnorm._BatchNorm), module
        assert "BatchNorm" not in type(module).__name__, module
        assert not isinstance(module, (enn.IIDBatchNorm2d, enn.InnerBatchNorm)), module
    # per-example independence: an example's output does not change with its batch-mates
    model.eval()
    x = _x(4)
    with torch.no_grad():
        assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-5)


def test_models_share_no_tensors():
    """escnn caches basis modules across layers by default; dpeq models must stay independent."""
    first = build_model("eq_resnet9", widths=SMALL).double()
    second = build_model("eq_resnet9", widths=SMALL)
    assert all(t.dtype == torch.float32 for t in second.buffers())
    assert not {t.data_ptr() for t in first.buffers()} & {t.data_ptr() for t in second.buffers()}


def test_building_models_leaves_nothing_behind_in_escnn_caches():
    """A study process builds a model per run: escnn's He-initialisation cache must not keep them."""
    import gc
    import weakref

    from escnn.nn import init

    before = len(init.cached_he_vars)
    model = build_model("eq_resnet9", widths=SMALL)
    gone = weakref.ref(model.conv2.conv.basisexpansion)
    del model
    gc.collect()
    assert len(init.cached_he_vars) == before and gone() is None


def test_group_names():
    assert parse_group("D8") == (True, 8) and group_order("C16") == 16
    for bad in ("E4", "D0", "C", "4"):
        with pytest.raises(ValueError, match="unknown group"):
            parse_group(bad)
    with pytest.raises(ValueError, match="restrict=False"):
        build_model("eq_resnet9", group="C1", restrict=True)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg")


CASES = [(g, r) for g in GROUPS for r in (False, True) if not (g == "C1" and r)]


@pytest.mark.parametrize("group,restrict", CASES)
def test_feature_maps_are_exactly_equivariant(group, restrict):
    """Every stage's feature map transforms by the group it keeps (the subgroup after a restriction),
    for every 90° rotation and reflection in that group."""
    model = build_model("eq_resnet9", group=group, restrict=restrict, widths=SMALL)
    results = feature_equivariance_errors(model, _x())
    late_group = halved_subgroup(group)[0] if restrict else group
    tested = {r.stage for r in results}
    assert tested == {"stage1", "stage2", "stage3"}
    late = [r for r in results if r.stage == "stage3"]
    # the late stage is tested on exactly the grid-exact elements of the group it keeps
    reflections, rotations = parse_group(late_group)
    exact_rotations = len([k for k in range(rotations) if (4 * k) % rotations == 0])
    assert len(late) == exact_rotations * (2 if reflections else 1)
    worst = max(r.relative_error for r in results)
    assert worst <= 1e-5, [r for r in results if r.relative_error > 1e-5]


def test_a_non_identity_element_really_moves_the_features():
    """Guard against a vacuous check: rotating the input changes the feature map itself."""
    model = build_model("eq_resnet9", widths=SMALL).eval()
    x = _x()
    with torch.no_grad():
        f, g = model.feature_maps(x)["stage1"].tensor, model.feature_maps(torch.rot90(x, 1, (2, 3)))["stage1"].tensor
    assert (f - g).norm() / f.norm() > 0.1


def test_global_head_gives_invariant_logits_and_plain_baseline_does_not():
    eq = build_model("eq_resnet9", group="D4", restrict=False, widths=SMALL, head="global")
    plain = PlainResNet9(same_width_channels("D4", False, SMALL), head="global")
    x = _x(4)
    for turns in range(4):
        for flip in (False, True):
            if turns == 0 and not flip:
                continue
            assert invariance_error(eq, x, turns, flip) <= 1e-5
            assert invariance_error(plain, x, turns, flip) > 1e-2


def test_restricted_global_head_is_invariant_only_to_the_subgroup():
    model = build_model("eq_resnet9", group="D4", restrict=True, widths=SMALL, head="global")
    x = _x(4)
    assert invariance_error(model, x, 2) <= 1e-5  # 180° is in D2
    assert invariance_error(model, x, 0, flip=True) <= 1e-5 or invariance_error(model, x, 2, flip=True) <= 1e-5
    assert invariance_error(model, x, 1) > 1e-3  # 90° is not


def test_paper_head_keeps_spatial_layout_so_logits_are_not_invariant():
    model = build_model("eq_resnet9", group="D4", restrict=False, widths=SMALL, head="pool2x2")
    assert invariance_error(model, _x(4), 1) > 1e-3


def test_rotation_error_curve_is_exact_at_right_angles_only():
    model = build_model("eq_resnet9", group="C8", restrict=False, widths=SMALL, head="global")
    curve = dict(rotation_error_curve(model, _x(4), angles_deg=(0, 45, 90, 180)))
    assert curve[0] == 0 and curve[90] < 1e-4 and curve[180] < 1e-4
    assert curve[45] > 10 * max(curve[90], 1e-6)


def test_fields_for_width_never_drops_to_zero():
    assert fields_for_width(1, "D8") == 1


def test_paper_model_norm_groups_follow_the_official_code():
    """The official code (hlzl/equivariant, utils.closest_divisor) normalises conv1's 6 fields with 1 group,
    not 6; with identical filters the two choices change the logits by up to 0.22."""
    from dpeq_utils.models.layers import FieldGroupNorm

    model = build_model("eq_resnet9", group="D4", restrict=True, widths=(16, 32, 64), num_groups=8)
    groups = {name: module.groups for name, module in model.named_modules() if isinstance(module, FieldGroupNorm)}
    assert groups == {"conv1.norm": 1, "conv2.norm": 1, "res1.0.norm": 1, "res1.1.norm": 1, "norm1": 1,
                      "conv3.norm": 3, "conv4.norm": 3, "res2.0.norm": 3, "res2.1.norm": 3, "norm2": 3}
    assert model.num_fields == (6, 13, 39)


# ---------------------------------------------------------------------------------------------- Mish


def test_one_exp_mish_is_mish_and_its_derivative_in_float64():
    """The fused kernels' formulas, evaluated eagerly in float64, against F.mish and autograd through it,
    from deep in the negative tail to far past the exp cap (x = 20)."""
    from dpeq_utils.models.layers import _mish_backward, _mish_forward
    x = torch.cat([torch.linspace(-60, 60, 20001, dtype=torch.float64), torch.tensor([-1e4, 1e4], dtype=torch.float64)])
    x.requires_grad_(True)
    reference = torch.nn.functional.mish(x)
    (derivative,) = torch.autograd.grad(reference.sum(), x)
    with torch.no_grad():
        assert torch.allclose(_mish_forward(x), reference, rtol=1e-13, atol=1e-300)
        assert torch.allclose(_mish_backward(x, torch.ones_like(x)), derivative, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "grad_in_other_layout"])
def test_fused_mish_on_a_large_float32_map_matches_f_mish(layout, monkeypatch):
    """A map over FUSED_MISH_MIN_NUMEL goes through the compiled kernels (asserted), forward and backward
    equal F.mish's up to float32 rounding, in the input's memory layout."""
    from dpeq_utils.models import layers
    kernels = layers._FusedKernels()
    monkeypatch.setattr(layers, "FUSED_MISH", kernels)
    monkeypatch.setattr(layers, "FUSED_MISH_MIN_NUMEL", 1000)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 24, 16, 16, generator=generator) * 4
    grad = torch.randn(4, 24, 16, 16, generator=generator)
    if layout != "contiguous":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last":
        grad = grad.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compiler failure must not pass silently here
        y = layers.mish(x)
        (dx,) = torch.autograd.grad(y, x, grad)
    assert kernels.forward is not None and kernels.backward is not None and not kernels.failed
    assert y.stride() == x.stride() and dx.shape == x.shape
    x64 = x.detach().double().requires_grad_(True)
    y64 = torch.nn.functional.mish(x64)
    (dx64,) = torch.autograd.grad(y64, x64, grad.double())
    assert (y.double() - y64).abs().max() <= 2e-6 * y64.abs().max()
    assert (dx.double() - dx64).abs().max() <= 2e-6 * dx64.abs().max()


def test_mish_falls_back_to_f_mish_with_one_warning_when_compiling_fails(monkeypatch):
    from dpeq_utils.models import layers
    kernels = layers._FusedKernels()
    monkeypatch.setattr(layers, "FUSED_MISH", kernels)
    monkeypatch.setattr(layers, "FUSED_MISH_MIN_NUMEL", 10)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", no_compiler)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="fused Mish unavailable.*no C\\+\\+ compiler"):
        y = layers.mish(x)
    assert kernels.failed and torch.equal(y, torch.nn.functional.mish(x))
    assert not kernels.usable(x)  # from then on F.mish, no second warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        (dx,) = torch.autograd.grad(y.sum(), x)
    (expected,) = torch.autograd.grad(torch.nn.functional.mish(x).sum(), x)
    assert torch.allclose(dx, expected, rtol=1e-5, atol=1e-6)

