"""Audit of the priors and classifiers against independent references and edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diagvi.components.classifiers import LinearClassifier, MLPClassifier
from diagvi.components.priors import GaussianMixture, StandardNormal

LABELS = torch.tensor([0, 1, 2, 3, -1, -1])


def random_gmm(seed: int = 0, dtype=torch.float32) -> GaussianMixture:
    torch.manual_seed(seed)
    gmm = GaussianMixture(3, 4).to(dtype)
    with torch.no_grad():  # away from the symmetric start
        gmm.logits.copy_(torch.randn(4))
        gmm.raw_scales.copy_(torch.randn(4, 3))
    return gmm


def random_posterior(dtype=torch.float32, seed: int = 1) -> tuple[Normal, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    loc = (torch.randn(6, 3, generator=g) * 2).to(dtype)
    scale = (0.05 + torch.rand(6, 3, generator=g) * 2).to(dtype)
    qz = Normal(loc, scale, validate_args=False)  # as the encoder builds it
    return qz, loc + scale * torch.randn(6, 3, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_standard_normal_kl_matches_torch(dtype):
    qz, z = random_posterior(dtype)
    ref = kl_divergence(qz, Normal(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)))
    kl = StandardNormal(3).kl(qz, z, LABELS)
    assert kl.dtype == dtype
    torch.testing.assert_close(kl, ref.sum(-1))


def test_gmm_kl_matches_numpy():
    """Labelled: closed-form KL to the class component minus log pi_y; unlabelled: the
    one-sample ``log q(z) - log sum_k pi_k N(z; mu_k, sigma_k)``, computed in float64 numpy."""
    gmm = random_gmm()
    qz, z = random_posterior()
    kl = gmm.kl(qz, z, LABELS).detach().double().numpy()
    mu = gmm.means.detach().double().numpy()
    s = np.log1p(np.exp(gmm.raw_scales.detach().double().numpy())) + 1e-4
    pi = np.exp(gmm.logits.detach().double().numpy())
    pi /= pi.sum()
    qm, qs, zn = (t.detach().double().numpy() for t in (qz.loc, qz.scale, z))

    def log_normal(x, m, sd):
        return (-0.5 * ((x - m) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)).sum(-1)

    for i, y in enumerate(LABELS.tolist()):
        if y >= 0:
            closed = np.log(s[y] / qs[i]) + (qs[i] ** 2 + (qm[i] - mu[y]) ** 2) / (2 * s[y] ** 2)
            ref = (closed - 0.5).sum() - np.log(pi[y])
        else:
            log_p = np.log(sum(pi[k] * np.exp(log_normal(zn[i], mu[k], s[k])) for k in range(4)))
            ref = log_normal(zn[i], qm[i], qs[i]) - log_p
        assert kl[i] == pytest.approx(ref, rel=1e-5, abs=1e-5), i


def test_gmm_float64_and_far_latents():
    gmm = random_gmm().double()
    qz, z = random_posterior(torch.float64)
    kl = gmm.kl(qz, z, LABELS)
    assert kl.dtype == torch.float64
    # far from every component (float32): the log-sum-exp stays finite, and so do gradients
    gmm = random_gmm()
    qz, z = random_posterior()
    z = (z * 1e3).requires_grad_()
    kl = gmm.kl(qz, z, None)
    assert torch.isfinite(kl).all()
    kl.sum().backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(gmm.means.grad).all()


def test_gmm_nonfinite_latent_gives_a_nonfinite_term_not_an_error():
    """A NaN latent must surface as a NaN loss term, which the training step then raises as a
    ``FloatingPointError`` or skips (``nonfinite="skip"``), as with the normal prior; the GMM
    raised torch's ``ValueError`` from distribution argument validation instead."""
    gmm = random_gmm()
    qz, z = random_posterior()
    z[5, 0] = float("nan")
    kl = gmm.kl(qz, z, LABELS)
    assert torch.isnan(kl[5])
    assert torch.isfinite(kl[:5]).all()  # labelled cells use q, not the sample


@pytest.mark.parametrize("cls", [LinearClassifier, MLPClassifier])
@pytest.mark.parametrize("labels", [[-1] * 6, [2, -1, -1, -1, -1, -1]])
def test_classifier_zero_loss_reaches_every_parameter(cls, labels):
    """Too few labelled cells in training: the zero loss must still use every classifier
    parameter. Under DDP (``trainer=ddp``, ``find_unused_parameters=False``) a parameter
    without a gradient makes the next step fail with "Expected to have finished reduction
    in the prior iteration"."""
    torch.manual_seed(0)
    clf = cls(3, 4)
    z = torch.randn(6, 3, requires_grad=True)
    loss = clf.loss(z, torch.tensor(labels))
    assert float(loss.detach()) == 0.0
    loss.backward()
    for name, p in clf.named_parameters():
        assert p.grad is not None, name
        assert (p.grad == 0).all(), name
    assert (z.grad == 0).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_classifier_rejects_non_finite_logit_scale(bad):
    with pytest.raises(ValueError, match="logit_scale"):
        LinearClassifier(3, 4, logit_scale=bad)
