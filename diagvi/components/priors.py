"""Priors p(z) over the cell latent, and the KL term each one contributes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, kl_divergence

from diagvi.registry import PRIORS


def kl_standard_normal(q: Normal) -> torch.Tensor:
    """Elementwise ``KL(q || N(0, 1))`` in closed form: ``(sigma^2 + mu^2 - 1) / 2 - log sigma``.

    The same values as ``kl_divergence(q, Normal(0, 1))`` in a third of the operations (it
    builds no prior and divides by no unit scale), which counts on a CPU where a training
    step is many small operations.
    """
    return 0.5 * (q.scale.square() + q.loc.square() - 1.0) - q.scale.log()


class Prior(nn.Module):
    """Base class. ``kl`` returns one value per cell (summed over latent dimensions).

    ``labels`` holds a class index per cell, ``-1`` for unlabelled cells, or is ``None``.
    """

    def kl(self, qz: Normal, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


@PRIORS.register("normal")
class StandardNormal(Prior):
    """``p(z) = N(0, I)``; the KL is in closed form."""

    def __init__(self, n_latent: int, n_labels: int = 0) -> None:
        super().__init__()

    def kl(self, qz, z, labels):
        return kl_standard_normal(qz).sum(-1)


@PRIORS.register("gmm")
class GaussianMixture(Prior):
    """Gaussian mixture ``p(z) = sum_k pi_k N(mu_k, diag sigma_k^2)`` with learnable parameters.

    With labels, component ``k`` *is* label ``k``: a labelled cell's term is
    ``KL(q(z|x) || N(mu_y, sigma_y)) - log pi_y`` (closed form); an unlabelled cell marginalises
    over all components, ``E_q[log q(z|x) - log sum_k pi_k N(z; mu_k, sigma_k)]`` (one sample).
    Unlabelled cells are never a class of their own.

    Parameters
    ----------
    n_latent
        Latent dimension.
    n_labels
        Number of label classes; when 0 (no labels) ``n_components`` are used instead.
    n_components
        Number of components without labels.
    """

    def __init__(self, n_latent: int, n_labels: int = 0, n_components: int = 10) -> None:
        super().__init__()
        k = n_labels or n_components
        self.logits = nn.Parameter(torch.zeros(k))
        self.means = nn.Parameter(torch.randn(k, n_latent))
        self.raw_scales = nn.Parameter(torch.zeros(k, n_latent))

    def components(self) -> Normal:
        # no argument validation (as the encoders): a non-finite latent must give a
        # non-finite KL, which the training step raises or skips (``nonfinite``), not a
        # ValueError from torch.distributions; validation also syncs with the GPU every step
        return Normal(self.means, F.softplus(self.raw_scales) + 1e-4, validate_args=False)

    def kl(self, qz, z, labels):
        log_pi = torch.log_softmax(self.logits, -1)
        comp = self.components()
        log_pz_k = comp.log_prob(z.unsqueeze(-2)).sum(-1) + log_pi  # (cells, components)
        marginal = qz.log_prob(z).sum(-1) - torch.logsumexp(log_pz_k, -1)
        if labels is None:
            return marginal
        known = labels >= 0
        y = labels.clamp_min(0)  # index only; unlabelled rows take the marginal below
        prior_y = Normal(comp.loc[y], comp.scale[y], validate_args=False)
        labelled = kl_divergence(qz, prior_y).sum(-1) - log_pi[y]
        return torch.where(known, labelled, marginal)
