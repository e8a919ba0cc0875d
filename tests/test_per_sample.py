"""Per-example gradients (vmap) against the definition: one backward pass per example (float64)."""

import pytest
import torch

from dpeq_utils.data import augment_views
from dpeq_utils.models import build_model
from dpeq_utils.per_sample import naive_per_sample_grads, vmap_per_sample_grads
from conftest import relative_error

SMALL = (8, 16, 16)


def _inputs(batch=3, views=2):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    return augment_views(images, views, generator), labels


def _check(model):
    model = model.double().train()
    views, labels = _inputs()
    fast, losses = vmap_per_sample_grads(model, views, labels)
    slow = naive_per_sample_grads(model, views, labels)
    assert fast.keys() == slow.keys() and len(fast) > 0
    for name in slow:
        assert fast[name].shape == (3, *dict(model.named_parameters())[name].shape)
        assert relative_error(fast[name], slow[name]) <= 1e-8, name
    # examples really differ (the check is not satisfied by a broadcast batch gradient)
    flat = torch.cat([g.flatten(1) for g in fast.values()], 1)
    assert relative_error(flat[0], flat[1]) > 1e-3
    assert losses.shape == (3,)


@pytest.mark.parametrize("group,restrict", [("D4", True), ("C8", False), ("D1", True), ("C1", False)])
def test_equivariant_resnet9(group, restrict):
    _check(build_model("eq_resnet9", group=group, restrict=restrict, widths=SMALL))


@pytest.mark.parametrize("name", ["resnet9", "resnet9_matched"])
def test_plain_resnet9_baselines(name):
    _check(build_model(name, widths=SMALL))


def test_wrn16_4():
    _check(build_model("wrn16_4"))


def test_views_are_averaged_per_example():
    """An example's gradient with K views is the mean of its single-view gradients."""
    model = build_model("eq_resnet9", widths=SMALL).double().train()
    views, labels = _inputs(batch=2, views=3)
    together, _ = vmap_per_sample_grads(model, views, labels)
    singles = [vmap_per_sample_grads(model, views[:, k:k + 1], labels)[0] for k in range(3)]
    for name, grad in together.items():
        assert relative_error(grad, sum(s[name] for s in singles) / 3) <= 1e-10


def test_rejects_unbatched_views():
    model = build_model("resnet9", widths=SMALL)
    with pytest.raises(ValueError, match=r"\(B, K, C, H, W\)"):
        vmap_per_sample_grads(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
