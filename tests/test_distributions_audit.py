"""Audit of diagvi.distributions: regressions for the defects found (see each docstring)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from diagvi.distributions import (
    CompositionNegativeBinomial,
    NegativeBinomial,
    ZeroInflatedGamma,
    ZeroInflatedLogNormal,
)

NAN = float("nan")


@pytest.mark.parametrize(
    "make",
    [
        lambda p, z: ZeroInflatedLogNormal(p, torch.ones(3), z),  # NaN loc
        lambda p, z: ZeroInflatedLogNormal(torch.zeros(3), p.abs() + 1.0, z),  # NaN scale
        lambda p, z: ZeroInflatedGamma(p.abs() + 1.0, torch.ones(3), z),  # NaN concentration
        lambda p, z: ZeroInflatedGamma(torch.ones(3), p.abs() + 1.0, z),  # NaN rate
    ],
)
def test_zero_inflated_continuous_nan_parameter_at_zero_gives_nan(make):
    """A NaN base parameter at ``x = 0`` gave the finite log(pi) with a NaN gradient: the loss
    looked fine (``nonfinite=raise/skip`` saw nothing) while the step wrote NaN weights."""
    param = torch.tensor([NAN, 0.5, 0.5], requires_grad=True)
    zi_logits = torch.full((3,), -1.0)
    lp = make(param, zi_logits).log_prob(torch.tensor([0.0, 0.0, 2.0]))
    assert torch.isnan(lp[0])
    want = torch.nn.functional.logsigmoid(torch.tensor(-1.0))
    torch.testing.assert_close(lp[1], want)  # finite parameters: the mass at zero, as before
    assert torch.isfinite(lp[1:]).all()
    (grad,) = torch.autograd.grad(lp[1:].sum(), param)
    assert torch.isfinite(grad[1:]).all()


@pytest.mark.parametrize("density", [0.1, 0.9])  # the nonzeros-only path and the dense one
def test_nb_float32_large_theta_exact_despite_a_nan_theta_elsewhere(density):
    """A NaN in one feature's theta made ``theta.amax()`` NaN, which switched the float64
    recomputation of ``lgamma(x + theta) - lgamma(theta)`` off for every other feature
    (theta = 1e6, x = 1, mu = 1: -1.4461 instead of -1.0000)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.full((16, 8), 2.0), generator=gen)
    x = x * (torch.rand(16, 8, generator=gen) < density)
    x[:, 0] = 1.0
    library = x.sum(-1, keepdim=True)
    eta = torch.randn(16, 8, generator=gen)
    theta = torch.full((1, 8), 1e6)
    theta[0, 5] = NAN
    mu = library * torch.softmax(eta, -1)
    n, m = 1e6, mu.double().numpy()
    want = stats.nbinom.logpmf(x.numpy(), n, n / (n + m))
    for dist in (NegativeBinomial(mu, theta), CompositionNegativeBinomial(eta, library, theta)):
        got = dist.log_prob(x).double().numpy()
        assert np.isnan(got[:, 5]).all()
        keep = np.arange(8) != 5
        np.testing.assert_allclose(got[:, keep], want[:, keep], rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("density", [0.1, 0.9])
def test_composition_nb_with_float64_counts_and_float32_eta(density):
    """float64 counts (e.g. ``torch.from_numpy`` of an AnnData matrix) with a float32 decoder
    output: the fused path raised ``index_add_(): self (Float) and source (Double)`` on sparse
    data and returned float32 on dense data; :class:`NegativeBinomial` promotes to float64."""
    gen = torch.Generator().manual_seed(1)
    x = torch.poisson(torch.full((6, 30), 3.0, dtype=torch.float64), generator=gen)
    x = x * (torch.rand(6, 30, generator=gen, dtype=torch.float64) < density)
    x[:, 0] += 1.0
    library = x.sum(-1, keepdim=True).float()
    eta = torch.randn(6, 30, generator=gen, requires_grad=True)
    theta = (torch.rand(1, 30, generator=gen) + 0.5).requires_grad_()
    got = CompositionNegativeBinomial(eta, library, theta).log_prob(x)
    want = NegativeBinomial(library * torch.softmax(eta, -1), theta).log_prob(x)
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got.sum(), (eta, theta))
    torch.testing.assert_close(grads, torch.autograd.grad(want.sum(), (eta, theta)))
    # integer counts stay on the fused path, in eta's dtype
    ints = CompositionNegativeBinomial(eta, library, theta).log_prob(x.long())
    assert ints.dtype == torch.float32
    torch.testing.assert_close(ints, want.float())
