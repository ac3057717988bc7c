"""Audit of the alignment losses (``diagvi.components.alignment``): edge-case minibatches,
non-finite latents, and float32 accuracy of clouds that sit far from the origin."""

from __future__ import annotations

import pytest
import torch

from diagvi.components.alignment import UnbalancedSinkhorn, adaptive_blur


def clouds(n: int = 40, m: int = 30, d: int = 4, dtype=torch.float32, seed: int = 0):
    """Two latent clouds and the linked features of their cells."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randn(m, d, generator=g, dtype=dtype) * 0.9 + 0.3
    features = {
        "a": torch.randn(n, 6, generator=g, dtype=dtype),
        "b": torch.randn(m, 6, generator=g, dtype=dtype) * 1.1,
    }
    return x, y, features


def value_and_gradients(align, x, y, features):
    x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
    value = align({"a": x, "b": y}, features)
    return (value.detach(), *torch.autograd.grad(value, (x, y)))


@pytest.mark.parametrize("blur_mode", ["adaptive", "fixed", "annealed"])
@pytest.mark.parametrize("solver", ["dense", "geomloss"])
def test_a_non_finite_latent_gives_a_nan_term_not_an_error(blur_mode, solver):
    # the training loop names (nonfinite="raise") or skips (nonfinite="skip") a NaN term; the
    # epsilon-scaling schedule used to fail on it first: "ValueError: arange: cannot compute
    # length", which neither handles
    x, y, features = clouds()
    align = UnbalancedSinkhorn(blur_mode=blur_mode, solver=solver)
    for bad in (float("nan"), float("inf")):
        x_bad = x.clone()
        x_bad[3, 1] = bad
        assert torch.isnan(align({"a": x_bad, "b": y}, features))
        assert torch.isnan(align({"a": x_bad, "b": y}))


@pytest.mark.parametrize("feature_weight", [0.0, 0.5])
def test_std_rule_with_one_cell_in_each_modality(feature_weight):
    # one cost, whose spread is 0: epsilon is its floor (1e-8), not torch's NaN std of one value
    x, y, features = clouds(n=1, m=1)
    assert adaptive_blur(x, y, rule="std") == pytest.approx(1e-4)
    align = UnbalancedSinkhorn(epsilon_rule="std", feature_weight=feature_weight)
    assert torch.isfinite(align({"a": x, "b": y}, features))


def test_adaptive_blur_of_clouds_far_from_the_origin():
    # mean_ij |x_i - y_j|^2 / 2 from float32 clouds around (1000, ..., 1000): the expansion
    # mean|x|^2 + mean|y|^2 - 2 mean(x).mean(y) gave 7.0 for 7.50 (blur 0.592 for 0.612)
    x, y, _ = clouds(n=30, m=40, d=8)
    exact = ((x.double()[:, None] - y.double()[None]).square().sum(-1) / 2).mean()
    expected = float(0.05 * exact) ** 0.5
    assert adaptive_blur(x + 1000.0, y + 1000.0, scale=0.05) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("settings", [{}, {"scale_cost": "mean"}])
def test_collapsed_latent_far_from_the_origin_keeps_float32_accuracy(settings):
    # a float32 latent of spread 0.01 around (3, ..., 3) against the same points in float64:
    # the cost expansion |x|^2 / 2 + |y|^2 / 2 - x.y lost the value (0.2-0.5% off) and the
    # gradients (4% off) to rounding, with the defaults and with scale_cost="mean" alike
    x, y, features = clouds(n=64, m=50, d=8)
    x, y = 0.01 * x + 3.0, 0.01 * y + 3.0
    align = UnbalancedSinkhorn(**settings)
    got = value_and_gradients(align, x, y, features)
    double = {k: v.double() for k, v in features.items()}
    want = value_and_gradients(align, x.double(), y.double(), double)
    assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-5)
    for g, w in zip(got[1:], want[1:], strict=True):
        assert float((g.double() - w).norm() / w.norm()) < 1e-3


@pytest.mark.parametrize("feature_weight", [0.0, 0.5])
@pytest.mark.parametrize("solver", ["dense", "geomloss"])
def test_scale_cost_gradient_does_not_depend_on_the_origin(feature_weight, solver):
    # the divergence depends on differences only; with scale_cost="mean" its gradient used to
    # change when both clouds were moved by (3, ..., 3) (1-2.6%, in float64): the scale's
    # gradient carried the solver's net translation error times the distance to the origin
    x, y, features = clouds(dtype=torch.float64)
    align = UnbalancedSinkhorn(scale_cost="mean", feature_weight=feature_weight, solver=solver)
    value, gx, gy = value_and_gradients(align, x, y, features)
    moved, mx, my = value_and_gradients(align, x + 3.0, y + 3.0, features)
    torch.testing.assert_close(moved, value, rtol=1e-10, atol=0.0)
    torch.testing.assert_close(mx, gx, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(my, gy, rtol=1e-8, atol=1e-12)
    # as for any function of the differences, the gradients sum to zero over all points
    net = gx.sum(0) + gy.sum(0)
    torch.testing.assert_close(net, torch.zeros_like(net), rtol=0.0, atol=1e-12)


def test_tight_linked_features_far_from_the_origin():
    # linked features of spread 1e-3 around (5, ..., 5) in both modalities are scaled up to
    # their share of the cost, offset included: the float32 cost of the scaled coordinates
    # was lost to rounding (NaN, or 1.02 with centred latents, for 2.556; constant features:
    # 0.0 for 0.775, the divergence without features)
    x, y, features = clouds()
    align = UnbalancedSinkhorn()
    tight = {k: 1e-3 * v for k, v in features.items()}
    want = value_and_gradients(align, x, y, tight)
    got = value_and_gradients(align, x, y, {k: v + 5.0 for k, v in tight.items()})
    assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-4)  # inputs rounded at 5
    for g, w in zip(got[1:], want[1:], strict=True):
        assert float((g - w).norm() / w.norm()) < 1e-3
    constant = {k: torch.full_like(v, 5.0) for k, v in features.items()}
    torch.testing.assert_close(align({"a": x, "b": y}, constant), align({"a": x, "b": y}))
