"""Audit of the likelihoods: regressions for the bugs found (see each test's docstring)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from diagvi.components.likelihoods import Gaussian
from diagvi.distributions import (
    CompositionNegativeBinomial,
    NegativeBinomial,
    ZeroInflatedNegativeBinomial,
)


def _counts(cells: int, features: int, density: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(cells, features, generator=gen, dtype=torch.float64) * 4)
    x = x * (torch.rand(cells, features, generator=gen, dtype=torch.float64) < density)
    x[:, 1] += 1.0  # every cell has counts
    return x


@pytest.mark.parametrize("density", [0.1, 0.9])  # the nonzeros-only path and the dense one
@pytest.mark.parametrize("rows", [1, 12])  # one theta for all cells, or one per cell
def test_composition_nb_with_one_theta_column_broadcasts(rows, density):
    """A ``cells x 1`` (or ``1 x 1``) theta is one value per cell, as for
    :class:`NegativeBinomial`: the fused path read it as one per entry (IndexError)."""
    x = _counts(12, 9, density)
    library = x.sum(-1, keepdim=True)
    gen = torch.Generator().manual_seed(1)
    eta = torch.randn(12, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    theta = (torch.rand(rows, 1, generator=gen, dtype=torch.float64) + 0.3).requires_grad_()
    got = CompositionNegativeBinomial(eta, library, theta).log_prob(x)
    want = NegativeBinomial(library * torch.softmax(eta, -1), theta).log_prob(x)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got.sum(-1).mean(), (eta, theta))
    torch.testing.assert_close(grads, torch.autograd.grad(want.sum(-1).mean(), (eta, theta)))


@pytest.mark.parametrize("density", [0.1, 0.9])
@pytest.mark.parametrize("rows", [1, 40])  # theta per feature, or per cell
def test_nb_float32_log_pmf_of_counts_for_huge_theta(rows, density):
    """Genes close to Poisson (theta of 1e5 to 1e8) in float32: ``lgamma(x + theta) -
    lgamma(theta)`` cancelled (errors of 1 to 10 nats per count, log-pmfs > 0)."""
    x = _counts(40, 6, density).float()
    library = x.sum(-1, keepdim=True)
    gen = torch.Generator().manual_seed(2)
    eta = torch.randn(40, 6, generator=gen)
    theta = 10.0 ** (5.0 + 3.0 * torch.rand(rows, 6, generator=gen))
    mu = library * torch.softmax(eta, -1)
    n, m = theta.double().expand(40, 6).numpy(), mu.double().numpy()
    want = stats.nbinom.logpmf(x.numpy(), n, n / (n + m))
    for dist in (
        CompositionNegativeBinomial(eta, library, theta),
        NegativeBinomial(mu, theta),
        ZeroInflatedNegativeBinomial(mu, theta, torch.full_like(mu, -30.0)),
    ):
        got = dist.log_prob(x)
        assert got.dtype == torch.float32
        assert (got <= 0).all(), type(dist).__name__
        np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4, atol=2e-3)


def test_normal_likelihood_with_non_finite_eta_gives_a_non_finite_term():
    """Like every other likelihood, ``normal`` validates no arguments: a NaN decoder output
    gives a NaN loss term (which ``nonfinite=skip`` skips), not a ValueError."""
    lik = Gaussian(n_features=3, n_batches=1)
    eta = torch.tensor([[0.0, float("nan"), 1.0]])
    px = lik(eta, torch.zeros(1, dtype=torch.long), torch.ones(1, 1))
    lp = px.log_prob(torch.zeros(1, 3))
    assert torch.isnan(lp[0, 1]) and torch.isfinite(lp[0, [0, 2]]).all()
