"""Observation likelihoods p(x | eta, batch, library), one per data type.

A likelihood turns the decoder output ``eta`` (cells x features) into a
:class:`torch.distributions.Distribution`; the loss is always ``-px.log_prob(x)``,
``px.mean`` serves imputation and ``px.sample()`` posterior predictive checks.

Count likelihoods (``nb``, ``zinb``, ``nbmixture``) model the composition:
``mean = library * softmax(eta)`` (for ``zinb`` the mean of its NB part, before the extra
zeros; for ``nbmixture`` the mixture's mean). Continuous likelihoods use ``eta`` directly and
ignore the library. Every auxiliary parameter (dispersion, scale, zero-inflation, mixture) is
per batch and per feature, unconstrained in storage and mapped by softplus / sigmoid, so no
clamp ever stops its gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, Normal

from diagvi import distributions as D
from diagvi import fastmath
from diagvi.registry import LIKELIHOODS

_EPS = 1e-4


class Likelihood(nn.Module):
    """Base class: per-batch, per-feature parameters plus the encoder's input transform.

    Parameters
    ----------
    n_features
        Number of features of the modality.
    n_batches
        Number of batches of the modality.
    """

    counts: bool = False  # True: integer data, mean = library * softmax(eta)
    nonnegative: bool = False  # True: the data must be >= 0

    def __init__(self, n_features: int, n_batches: int) -> None:
        super().__init__()
        self.n_features = n_features
        self.n_batches = n_batches

    def _param(self, init: float = 0.0) -> nn.Parameter:
        return nn.Parameter(torch.full((self.n_batches, self.n_features), float(init)))

    @staticmethod
    def _per_cell(param: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Each cell's row of a per-batch parameter; with one batch the single row, which
        broadcasts: no cells x features copy, and its functions are computed once per feature."""
        return param if len(param) == 1 else param[batch]

    def transform(self, x: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
        """What the encoder sees: log1p of depth-normalised counts, log1p or identity."""
        if self.counts:
            return fastmath.log1p(x * (1e4 / library.clamp_min(1.0)))
        return fastmath.log1p(x) if self.nonnegative else x

    def forward(
        self, eta: torch.Tensor, batch: torch.Tensor, library: torch.Tensor
    ) -> Distribution:
        raise NotImplementedError

    def location(self, x: torch.Tensor) -> torch.Tensor:
        """Each cell's own location, which :meth:`initial_eta` reads averaged (here ``x``)."""
        return x

    def location_sums(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature sum and count, over the cells ``x``, of :meth:`location`: summed over
        chunks of cells, the data's average needs one pass."""
        return self.location(x).sum(0), torch.full_like(x[0], len(x))

    @torch.no_grad()
    def initial_eta(self, average: torch.Tensor) -> torch.Tensor:
        """The decoder's starting bias: ``eta`` of a cell at the data's ``average`` location.

        Training starts from the features' levels instead of learning them at the learning
        rate's pace (``eta = 0`` is, e.g., a uniform composition of every gene, and a
        ``log1p`` level of 0 for antibodies whose levels are 3-6).
        """
        return average


def _composition_mean(eta: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
    return library * torch.softmax(eta, dim=-1)


@LIKELIHOODS.register("nb")
class NB(Likelihood):
    """Negative binomial with per-batch, per-feature inverse dispersion."""

    counts = nonnegative = True

    def __init__(self, n_features: int, n_batches: int) -> None:
        super().__init__(n_features, n_batches)
        self.log_theta = self._param(1.0)

    def forward(self, eta, batch, library):
        return D.CompositionNegativeBinomial(
            eta, library, self._per_cell(self.log_theta.exp(), batch)
        )

    def location(self, x):
        return x / x.sum(-1, keepdim=True).clamp_min(1.0)  # the cell's composition

    @torch.no_grad()
    def initial_eta(self, average):
        # log of the average composition, centred (softmax ignores a constant)
        eta = torch.log(average + 1e-8)
        return eta - eta.mean()


@LIKELIHOODS.register("zinb")
class ZINB(NB):
    """Zero-inflated negative binomial; the extra-zero probability spans all of (0, 1)."""

    def __init__(self, n_features: int, n_batches: int) -> None:
        super().__init__(n_features, n_batches)
        self.zi_logits = self._param(-2.0)

    def forward(self, eta, batch, library):
        return D.ZeroInflatedNegativeBinomial(
            _composition_mean(eta, library),
            self._per_cell(self.log_theta.exp(), batch),
            self._per_cell(self.zi_logits, batch),
        )


@LIKELIHOODS.register("nbmixture")
class NBMixture(NB):
    """Two-component NB mixture (background / foreground, as for antibody counts).

    Foreground mean = background mean x ``r``, ``r = 1 + softplus(log_ratio)``; the foreground
    weight ``w = sigmoid(w_scale * eta + w_bias)`` depends on the cell through ``eta``. The
    background mean is ``library * softmax(eta) / (1 + w (r - 1))``, so that the mixture's
    mean is the composition ``library * softmax(eta)`` as for the other count likelihoods
    (imputed values then sum to the target library size).
    """

    def __init__(self, n_features: int, n_batches: int) -> None:
        super().__init__(n_features, n_batches)
        self.log_ratio = self._param(1.0)
        self.w_scale = self._param(1.0)
        self.w_bias = self._param(0.0)

    @torch.no_grad()
    def initial_eta(self, average):
        eta = super().initial_eta(average)
        # the foreground weight starts at 1/2 for every feature, whatever its level
        self.w_bias.copy_(-self.w_scale * eta)
        return eta

    def forward(self, eta, batch, library):
        ratio = 1.0 + self._per_cell(F.softplus(self.log_ratio), batch)
        weight_logits = self._per_cell(self.w_scale, batch) * eta + self._per_cell(
            self.w_bias, batch
        )
        background = _composition_mean(eta, library) / (
            1.0 + torch.sigmoid(weight_logits) * (ratio - 1.0)
        )
        foreground = background * ratio
        return D.NegativeBinomialMixture(
            foreground, background, self._per_cell(self.log_theta.exp(), batch), weight_logits
        )


@LIKELIHOODS.register("normal")
class Gaussian(Likelihood):
    """Normal with mean ``eta`` and per-batch, per-feature scale (for scaled/continuous data)."""

    def __init__(self, n_features: int, n_batches: int) -> None:
        super().__init__(n_features, n_batches)
        self.raw_scale = self._param(0.0)

    def scale(self, batch: torch.Tensor) -> torch.Tensor:
        return self._per_cell(F.softplus(self.raw_scale) + _EPS, batch)

    def forward(self, eta, batch, library):
        # no argument validation, as every other likelihood: a non-finite eta gives a
        # non-finite loss term (which training reports or skips), not a ValueError
        return Normal(eta, self.scale(batch), validate_args=False)


@LIKELIHOODS.register("log1pnormal")
class Log1pNormal(Gaussian):
    """``log1p(x) ~ Normal(eta, scale)`` for non-negative continuous data."""

    nonnegative = True

    def forward(self, eta, batch, library):
        return D.Log1pNormal(eta, self.scale(batch))

    def location(self, x):
        return torch.log1p(x)


@LIKELIHOODS.register("ziln")
class ZILN(Gaussian):
    """Zero-inflated log-normal: zeros with probability pi, else ``log x ~ Normal(eta, scale)``."""

    nonnegative = True

    def __init__(self, n_features: int, n_batches: int) -> None:
        super().__init__(n_features, n_batches)
        self.zi_logits = self._param(-2.0)

    def forward(self, eta, batch, library):
        return D.ZeroInflatedLogNormal(
            eta, self.scale(batch), self._per_cell(self.zi_logits, batch)
        )

    def location_sums(self, x):
        nonzero = x > 0  # the log-normal part
        return torch.log(x.clamp_min(1e-30)).mul_(nonzero).sum(0), nonzero.sum(0).to(x.dtype)


@LIKELIHOODS.register("zig")
class ZIG(Likelihood):
    """Zero-inflated gamma: zeros with probability pi, else Gamma with mean ``softplus(eta)``."""

    nonnegative = True

    def __init__(self, n_features: int, n_batches: int) -> None:
        super().__init__(n_features, n_batches)
        self.raw_concentration = self._param(0.5)
        self.zi_logits = self._param(-2.0)

    def forward(self, eta, batch, library):
        concentration = self._per_cell(F.softplus(self.raw_concentration) + _EPS, batch)
        mean = F.softplus(eta) + _EPS
        return D.ZeroInflatedGamma(
            concentration, concentration / mean, self._per_cell(self.zi_logits, batch)
        )

    def location_sums(self, x):
        nonzero = x > 0  # the gamma part
        return (x * nonzero).sum(0), nonzero.sum(0).to(x.dtype)

    @torch.no_grad()
    def initial_eta(self, average):
        mean = average.clamp_min(1e-3)
        return mean + torch.log(-torch.expm1(-mean))  # softplus(eta) = mean
