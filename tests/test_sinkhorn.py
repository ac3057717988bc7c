"""Our dense Sinkhorn divergence (``diagvi.components.sinkhorn``) against GeomLoss."""

from __future__ import annotations

import math

import pytest
import torch
from geomloss import SamplesLoss

from diagvi.components.sinkhorn import epsilon_schedule, ground_cost, sinkhorn_divergence


def clouds(n: int = 60, m: int = 45, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64) * 0.7 + 0.8
    return x.requires_grad_(), y.requires_grad_()


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reach", [None, 0.5, 3.0])
@pytest.mark.parametrize("diameter", [None, 6.0])
@pytest.mark.parametrize("sizes", [(60, 45), (50, 50)])  # equal sizes: the stacked path
def test_value_and_gradients_equal_geomloss(p, reach, diameter, sizes):
    x, y = clouds(*sizes)
    settings = {"p": p, "blur": 0.1, "reach": reach, "diameter": diameter, "scaling": 0.5}
    ours = sinkhorn_divergence(x, y, **settings)
    gx, gy = torch.autograd.grad(ours, (x, y))
    theirs = SamplesLoss("sinkhorn", debias=True, backend="tensorized", **settings)(x, y)
    tx, ty = torch.autograd.grad(theirs, (x, y))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gx, tx, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(gy, ty, rtol=1e-5, atol=1e-8)


def test_divergence_of_a_cloud_with_itself_is_zero_and_grows_with_distance():
    x, _ = clouds()
    assert abs(float(sinkhorn_divergence(x.detach(), x.detach().clone(), blur=0.05))) < 1e-6
    x = x.detach()
    values = [float(sinkhorn_divergence(x, x + shift, blur=0.05)) for shift in (0.5, 2.0)]
    assert 0 < values[0] < values[1]


def test_ground_cost():
    x, y = clouds(4, 3)
    direct = (x[:, None] - y[None]).norm(dim=-1)
    torch.testing.assert_close(ground_cost(x, y, 1), direct)
    torch.testing.assert_close(ground_cost(x, y, 2), direct.square() / 2)
    with pytest.raises(ValueError, match="p must be"):
        ground_cost(x, y, 3)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("sizes", [(60, 45), (50, 50)])
def test_fixed_coordinates_equal_concatenated_clouds(p, sizes):
    x, y = clouds(*sizes)
    g = torch.Generator().manual_seed(7)
    fx, fy = (torch.rand(k, 8, generator=g, dtype=torch.float64) for k in sizes)
    settings = {"p": p, "blur": 0.1, "reach": 1.0, "diameter": "max_cost"}
    fixed = sinkhorn_divergence(x, y, x_fixed=fx, y_fixed=fy, **settings)
    gx, gy = torch.autograd.grad(fixed, (x, y))
    whole = sinkhorn_divergence(torch.cat([x, fx], 1), torch.cat([y, fy], 1), **settings)
    tx, ty = torch.autograd.grad(whole, (x, y))
    torch.testing.assert_close(fixed, whole, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(gx, tx, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gy, ty, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="together"):
        sinkhorn_divergence(x, y, x_fixed=fx)


@pytest.mark.parametrize("feature_weight", [0.0, 0.5])
def test_alignment_solvers_agree(feature_weight):
    from diagvi.components.alignment import UnbalancedSinkhorn

    x, y = clouds(40, 40, d=4, seed=3)
    g = torch.Generator().manual_seed(4)
    features = {"a": torch.randn(40, 3, generator=g), "b": torch.randn(40, 3, generator=g)}
    values = {}
    for solver in ("dense", "geomloss"):
        align = UnbalancedSinkhorn(
            feature_weight=feature_weight, solver=solver, schedule="geomloss"
        )
        value = align({"a": x, "b": y}, features)
        values[solver] = (value, *torch.autograd.grad(value, (x, y)))
    for ours, theirs in zip(values["dense"], values["geomloss"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="solver"):
        UnbalancedSinkhorn(solver="keops")


@pytest.mark.parametrize("p", [1, 2])
def test_diameter_from_the_cost_matrix(p):
    x, y = clouds(40, 30, seed=5)
    largest = float(torch.cdist(x, y).max())  # (p * max C)^(1/p) for either cost
    from_cost = sinkhorn_divergence(x, y, p=p, blur=0.1, reach=1.0, diameter="max_cost")
    given = sinkhorn_divergence(x, y, p=p, blur=0.1, reach=1.0, diameter=largest)
    torch.testing.assert_close(from_cost, given)
    with pytest.raises(ValueError, match="max_cost"):
        sinkhorn_divergence(x, y, diameter="largest")


def test_calls_sharing_scratch_memory_keep_their_own_values_and_gradients():
    torch.manual_seed(3)
    clouds = [
        (torch.randn(n, 4, requires_grad=True), torch.randn(m, 4) + 1)
        for n, m in ((30, 20), (12, 25))
    ]
    alone = []
    for x, y in clouds:
        value = sinkhorn_divergence(x, y, blur=0.3, reach=1.0, diameter="max_cost")
        (grad,) = torch.autograd.grad(value, x)
        alone.append((value.detach(), grad))
    # both forwards before either backward: the second call reuses the first one's scratch
    values = [
        sinkhorn_divergence(x, y, blur=0.3, reach=1.0, diameter="max_cost") for x, y in clouds
    ]
    grads = torch.autograd.grad(sum(values), [x for x, _ in clouds])
    for value, grad, (value_alone, grad_alone) in zip(values, grads, alone, strict=True):
        assert torch.equal(value.detach(), value_alone)
        assert torch.allclose(grad, grad_alone, atol=1e-6)


def value_and_gradients(x, y, **settings):
    value = sinkhorn_divergence(x, y, **settings)
    return (value.detach(), *torch.autograd.grad(value, (x, y)))


def relative_error(got, want) -> float:
    return max(float((g - w).norm() / w.norm()) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reach", [None, 1.0])
@pytest.mark.parametrize("blur", [0.05, 0.3])
@pytest.mark.parametrize("sizes", [(60, 45), (50, 50)])
def test_short_schedule_is_within_a_fraction_of_the_scaling_error(p, reach, blur, sizes):
    # the debiasing problems on the last three temperatures only: the value and the
    # gradients stay far closer to GeomLoss' schedule than that schedule is to the converged
    # divergence (epsilon-scaling with a ratio near 1)
    x, y = clouds(*sizes)
    settings = {"p": p, "blur": blur, "reach": reach, "diameter": "max_cost", "scaling": 0.5}
    geomloss = value_and_gradients(x, y, **settings, schedule="geomloss")
    short = value_and_gradients(x, y, **settings, schedule="short")
    converged = value_and_gradients(x, y, **{**settings, "scaling": 0.98}, schedule="geomloss")
    assert relative_error(short, geomloss) < 1e-2
    assert relative_error(short, geomloss) < relative_error(geomloss, converged) / 5


def test_short_schedule_of_three_temperatures_or_fewer_is_geomloss():
    # diameter below the blur: the schedule is (diameter^p, blur^p), and the debiasing
    # problems, on its last three temperatures, are solved from the start as GeomLoss does
    x, y = clouds(10, 12)
    settings = {"blur": 0.5, "reach": 2.0, "diameter": 0.2}
    short = value_and_gradients(x, y, **settings, schedule="short")
    geomloss = value_and_gradients(x, y, **settings, schedule="geomloss")
    for s, g in zip(short, geomloss, strict=True):
        torch.testing.assert_close(s, g, rtol=1e-12, atol=1e-14)


def short_schedule_written_out(x, y, blur, reach, scaling, symmetric=3):
    """The short schedule as four separate potentials and plain log-sum-exps (p = 2)."""
    n, m = len(x), len(y)
    a_log = torch.full((n,), -math.log(n), dtype=x.dtype)
    b_log = torch.full((m,), -math.log(m), dtype=y.dtype)
    rho = None if reach is None else reach**2

    def softmin(eps, source, target, h):
        damping = 1.0 if rho is None else 1.0 / (1.0 + eps / rho)
        cost = (source[:, None] - target[None]).square().sum(-1) / 2
        return -eps * damping * torch.logsumexp(h[None] - cost / eps, 1)

    with torch.no_grad():
        xd, yd = x.detach(), y.detach()
        diameter = max(float((xd[:, None] - yd[None]).square().sum(-1).max().sqrt()), blur)
        schedule = epsilon_schedule(2, diameter, blur, scaling)
        joins = max(len(schedule) - symmetric, 0)
        f_ba, g_ab = softmin(schedule[0], xd, yd, b_log), softmin(schedule[0], yd, xd, a_log)
        for i, eps in enumerate(schedule):
            if i == joins:
                f_aa, g_bb = softmin(eps, xd, xd, a_log), softmin(eps, yd, yd, b_log)
            if i == 0 < joins and rho is not None:  # unbalanced: the first soft-min alone
                continue
            f_ba, g_ab = (
                (f_ba + softmin(eps, xd, yd, b_log + g_ab / eps)) / 2,
                (g_ab + softmin(eps, yd, xd, a_log + f_ba / eps)) / 2,
            )
            if i >= joins:
                f_aa = (f_aa + softmin(eps, xd, xd, a_log + f_aa / eps)) / 2
                g_bb = (g_bb + softmin(eps, yd, yd, b_log + g_bb / eps)) / 2
    # the last extrapolation, from the converged potentials, carries the gradient
    eps, old = schedule[-1], (f_aa, g_bb, f_ba, g_ab)
    f_aa = softmin(eps, x, xd, a_log + old[0] / eps)
    g_bb = softmin(eps, y, yd, b_log + old[1] / eps)
    f_ba = softmin(eps, x, yd, b_log + old[3] / eps)
    g_ab = softmin(eps, y, xd, a_log + old[2] / eps)
    a, b = a_log.exp(), b_log.exp()
    if rho is None:
        return a @ (f_ba - f_aa) + b @ (g_ab - g_bb)
    return (rho + eps / 2) * (
        a @ ((-f_aa / rho).exp() - (-f_ba / rho).exp())
        + b @ ((-g_bb / rho).exp() - (-g_ab / rho).exp())
    )


@pytest.mark.parametrize("reach", [None, 1.0])
@pytest.mark.parametrize("sizes", [(30, 22), (25, 25)])
@pytest.mark.parametrize("blur", [0.05, 0.3])
def test_short_schedule_equals_its_written_out_form(reach, sizes, blur):
    x, y = clouds(*sizes)
    settings = {"blur": blur, "reach": reach, "scaling": 0.5}
    ours = value_and_gradients(x, y, **settings, diameter="max_cost", schedule="short")
    value = short_schedule_written_out(x, y, **settings)
    written = (value.detach(), *torch.autograd.grad(value, (x, y)))
    for o, w in zip(ours, written, strict=True):
        torch.testing.assert_close(o, w, rtol=1e-10, atol=1e-12)


def test_unknown_schedule_is_refused():
    from diagvi.components.alignment import UnbalancedSinkhorn

    x, y = clouds(5, 5)
    with pytest.raises(ValueError, match="schedule must be one of"):
        sinkhorn_divergence(x, y, schedule="fast")
    with pytest.raises(ValueError, match="schedule must be one of"):
        UnbalancedSinkhorn(schedule="fast")
