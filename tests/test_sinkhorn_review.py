"""Review of the fixed coordinates and the stacked problems of ``sinkhorn_divergence``.

Everything against GeomLoss' ``SamplesLoss`` on the concatenated clouds ``[x, x_fixed]`` and
``[y, y_fixed]`` (float64), and the shared scratch memory across calls.
"""

from __future__ import annotations

import pytest
import torch
from geomloss import SamplesLoss

from diagvi.components.alignment import UnbalancedSinkhorn
from diagvi.components.sinkhorn import sinkhorn_divergence


def clouds(n: int, m: int, k: int = 4, seed: int = 0, dtype=torch.float64):
    """Latent clouds ``x``, ``y`` (with gradient) and fixed coordinates ``fx``, ``fy``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=dtype)
    y = torch.randn(m, 3, generator=g, dtype=dtype) * 0.7 + 0.8
    fx = torch.rand(n, k, generator=g, dtype=dtype)
    fy = torch.rand(m, k, generator=g, dtype=dtype) + 0.3
    return x.requires_grad_(), y.requires_grad_(), fx, fy


def geomloss_on_concatenation(x, y, fx, fy, diameter, **settings):
    xs, ys = torch.cat([x, fx], 1), torch.cat([y, fy], 1)
    if diameter == "max_cost":
        diameter = float(torch.cdist(xs, ys).detach().max())
    loss = SamplesLoss("sinkhorn", debias=True, backend="tensorized", diameter=diameter, **settings)
    return loss(xs, ys)


def assert_same_value_and_gradients(ours, theirs, x, y):
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-10)
    grads = torch.autograd.grad(ours, (x, y)), torch.autograd.grad(theirs, (x, y))
    for g, t in zip(*grads, strict=True):
        torch.testing.assert_close(g, t, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reach", [None, 1.5])
@pytest.mark.parametrize(
    ("sizes", "diameter", "scaling", "k"),
    [
        ((7, 11), None, 0.5, 4),
        ((11, 7), 4.0, 0.9, 4),
        ((1, 5), "max_cost", 0.5, 4),
        ((5, 1), None, 0.9, 0),  # fixed coordinates without columns
        ((9, 9), "max_cost", 0.9, 0),
    ],
)
def test_fixed_coordinates_equal_geomloss_on_the_concatenation(
    p, reach, sizes, diameter, scaling, k
):
    x, y, fx, fy = clouds(*sizes, k=k)
    settings = {"p": p, "blur": 0.3, "reach": reach, "scaling": scaling}
    ours = sinkhorn_divergence(x, y, diameter=diameter, x_fixed=fx, y_fixed=fy, **settings)
    theirs = geomloss_on_concatenation(x, y, fx, fy, diameter, **settings)
    assert_same_value_and_gradients(ours, theirs, x, y)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("diameter", [None, 4.0])
def test_blur_larger_than_the_diameter_equals_geomloss(p, diameter):
    """GeomLoss then starts from ``diameter^p`` below ``blur^p``: one iteration at the blur."""
    x, y, fx, fy = clouds(9, 6)
    settings = {"p": p, "blur": 20.0, "reach": 1.5}
    ours = sinkhorn_divergence(x, y, diameter=diameter, x_fixed=fx, y_fixed=fy, **settings)
    theirs = geomloss_on_concatenation(x, y, fx, fy, diameter, **settings)
    assert_same_value_and_gradients(ours, theirs, x, y)
    # coincident points (a zero diameter, where GeomLoss fails): zero, not an error
    point = torch.zeros(1, 2, dtype=torch.float64)
    assert float(sinkhorn_divergence(point, point.clone(), p, blur=0.1, diameter=diameter)) == 0


def test_fixed_coordinates_that_require_grad_get_none_and_float32():
    x, y, fx, fy = clouds(8, 5, dtype=torch.float32)
    fx.requires_grad_(), fy.requires_grad_()
    for p in (1, 2):
        value = sinkhorn_divergence(x, y, p, blur=0.3, reach=1.0, x_fixed=fx, y_fixed=fy)
        assert value.dtype == torch.float32
        value.backward()
        assert fx.grad is None and fy.grad is None and x.grad is not None
        theirs = geomloss_on_concatenation(x, y, fx, fy, None, p=p, blur=0.3, reach=1.0)
        torch.testing.assert_close(value, theirs, rtol=1e-5, atol=1e-6)


def test_fixed_coordinates_in_a_wider_dtype_promote_as_the_concatenation():
    """float32 latents, float64 features: the value of ``[x, fx]`` (float64), as before."""
    x, y, fx, fy = clouds(8, 5, dtype=torch.float32)
    fx, fy = fx.double(), fy.double()
    values = {}
    for solver in ("dense", "geomloss"):
        align = UnbalancedSinkhorn(solver=solver, schedule="geomloss")
        value = align({"a": x, "b": y}, {"a": fx, "b": fy})
        values[solver] = (value, *torch.autograd.grad(value, (x, y)))
    for ours, theirs in zip(values["dense"], values["geomloss"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("scale_cost", [None, "mean"])
@pytest.mark.parametrize("blur_mode", ["adaptive", "fixed", "annealed"])
def test_alignment_solvers_agree_with_features(p, scale_cost, blur_mode):
    x, y, fx, fy = clouds(13, 20, seed=p)
    values = {}
    for solver in ("dense", "geomloss"):
        align = UnbalancedSinkhorn(
            p=p,
            blur_mode=blur_mode,
            blur=0.2,
            blur_start=0.8,
            scale_cost=scale_cost,
            solver=solver,
            schedule="geomloss",
        )
        value = align({"a": x, "b": y}, {"a": fx, "b": fy})
        values[solver] = (value, *torch.autograd.grad(value, (x, y)))
    for ours, theirs in zip(values["dense"], values["geomloss"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-10)


def test_shared_scratch_memory_across_sizes_and_pending_backwards():
    """Larger then smaller stacks, all forwards before any backward: as each call alone."""
    sizes = [(40, 30), (5, 3), (30, 40), (1, 1), (3, 7)]
    alone = {}
    for s in sizes:
        x, y, fx, fy = clouds(*s, seed=sum(s))
        value = sinkhorn_divergence(x, y, blur=0.2, reach=1.0, x_fixed=fx, y_fixed=fy)
        alone[s] = (value.detach(), *torch.autograd.grad(value, (x, y)))
    calls = []
    for s in sizes:
        x, y, fx, fy = clouds(*s, seed=sum(s))
        calls.append((sinkhorn_divergence(x, y, blur=0.2, reach=1.0, x_fixed=fx, y_fixed=fy), x, y))
    grads = torch.autograd.grad(sum(v for v, *_ in calls), [t for _, *xy in calls for t in xy])
    for i, (s, (value, *_)) in enumerate(zip(sizes, calls, strict=True)):
        assert torch.equal(value.detach(), alone[s][0])
        assert torch.equal(grads[2 * i], alone[s][1]) and torch.equal(grads[2 * i + 1], alone[s][2])
