"""Observation likelihoods that ``torch.distributions`` lacks.

Count models (gene expression, accessibility counts):

* :class:`NegativeBinomial` -- NB with mean ``mu`` and inverse dispersion ``theta``.
* :class:`ZeroInflatedNegativeBinomial` -- NB with an extra point mass at zero.
* :class:`NegativeBinomialMixture` -- two-component NB mixture sharing ``theta``
  (e.g. background / foreground protein counts).

Continuous non-negative models (normalised or continuous measurements):

* :class:`Log1pNormal` -- ``log1p(X)`` is Normal.
* :class:`ZeroInflatedLogNormal` -- point mass at zero, else LogNormal.
* :class:`ZeroInflatedGamma` -- point mass at zero, else Gamma.

All classes take unconstrained zero-inflation / mixture *logits*, do no argument
validation (``arg_constraints = {}``), broadcast their parameters to a common
``batch_shape`` and compute ``log_prob`` in a numerically stable,
gradient-safe way (finite gradients at ``value == 0``).  For the zero-inflated
continuous models ``log_prob`` mixes a probability mass at zero with a density
elsewhere, which is the usual convention for such likelihoods.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributions import Distribution, Gamma, LogNormal, Normal, constraints
from torch.distributions.utils import broadcast_all, lazy_property

from diagvi import fastmath

__all__ = [
    "NegativeBinomial",
    "CompositionNegativeBinomial",
    "ZeroInflatedNegativeBinomial",
    "NegativeBinomialMixture",
    "Log1pNormal",
    "ZeroInflatedLogNormal",
    "ZeroInflatedGamma",
]

Param = torch.Tensor | float
_NO_SHAPE = torch.Size()
# the NB log-pmf uses the sparse path below this fraction of nonzero entries (measured:
# 2.4x faster at 3-10 %, equal at about 30 %, 1.7x slower at 55 %)
_SPARSE_ENOUGH = 0.25
# above this theta, float32 loses lgamma(x + theta) - lgamma(theta) (about
# theta log(theta) 6e-8: 0.1 at 1e5, > 1 at 1e7): recomputed in float64 on a CPU
_LARGE_THETA = 1e4


def _nb_log_prob(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float
) -> torch.Tensor:
    r"""Negative-binomial log-pmf in the (mean, inverse-dispersion) parametrisation.

    .. math::
        \log p(x) = \log\Gamma(x+\theta) - \log\Gamma(\theta) - \log\Gamma(x+1)
        + \theta \log\frac{\theta}{\theta+\mu} + x \log\frac{\mu}{\theta+\mu}

    ``eps`` is added inside every logarithm, so ``mu -> 0`` stays finite. The term in
    ``theta`` alone is :math:`-\theta \log(1 + \mu / \theta)`, and the log-gamma difference
    is differentiated by :func:`_digamma_ratio`: written as differences of logarithms (or
    digammas) of nearly equal numbers, float32 loses the value and the gradient in ``theta``
    once ``theta >> mu`` (genes close to Poisson). The log-gamma terms
    vanish where ``x = 0``, so they are computed on the nonzero entries only: count data are
    mostly zeros (scRNA-seq: often > 90%), and the log-gamma functions and their digamma
    gradients are the expensive part of a training step on a CPU (the other terms are cheap
    elementwise work, done densely: gathering them costs more in the backward). A per-feature
    ``theta`` gets its ``log Gamma(theta)`` per feature, then gathered; at many whole counts
    the log-gamma terms come from the tables of :class:`_WholeCounts`. Every entry is computed
    on an accelerator, where elementwise work is cheap and finding the nonzeros would
    synchronise with the host, and for dense data (e.g. spatial spots): gathering and
    scattering the nonzeros costs more than it saves above about 30 % nonzeros.
    """
    out = -theta * torch.log1p(mu / (theta + eps))
    out = out + x * (torch.log(mu + eps) - torch.log(theta + mu + eps))
    if out.dim() == 0 or not _sparse_enough(x):
        whole = _WholeCounts.of(x, None, theta) if x.dim() == 2 else None
        if whole is not None:
            return out + _WholeCountTerms.apply(theta, whole)
        return out + _LgammaRatio.apply(x, theta) - torch.lgamma(x + 1)
    flat = x.expand(out.shape).reshape(-1)
    nonzero = fastmath.flat_nonzero(flat)
    xn = flat[nonzero]
    n_features = out.shape[-1]
    # one value per feature (a cells x 1 theta with as many cells as features is per cell)
    if theta.dim() > 0 and theta.shape[-1] == n_features == theta.numel():
        column, per_feature = nonzero % n_features, theta.reshape(1, -1)
        whole = _WholeCounts.of(xn, column, per_feature)
        if whole is not None:
            counts = _WholeCountTerms.apply(per_feature, whole)
        else:
            counts = _LgammaRatio.apply(xn, theta.reshape(-1)[column]) - torch.lgamma(xn + 1)
    else:
        thetan = theta.expand(out.shape).reshape(-1)[nonzero]
        counts = _LgammaRatio.apply(xn, thetan) - torch.lgamma(xn + 1)
    return out.reshape(-1).index_add(0, nonzero, counts).view(out.shape)


class _LgammaRatio(torch.autograd.Function):
    r"""``lgamma(x + theta) - lgamma(theta)`` (``x``: data, no gradient), differentiated in
    ``theta`` by :func:`_digamma_ratio`: autograd's ``digamma(x + theta) - digamma(theta)``,
    summed per feature, cancels in float32 once ``theta >> x``."""

    @staticmethod
    def forward(ctx, x, theta):
        ctx.save_for_backward(x, theta)
        return _large_theta_exact(torch.lgamma(x + theta) - torch.lgamma(theta), x, theta)

    @staticmethod
    def backward(ctx, grad):
        x, theta = ctx.saved_tensors
        return None, (grad * _digamma_ratio(x, theta)).sum_to_size(theta.shape)


def _large_theta_exact(
    ratio: torch.Tensor, x: torch.Tensor, theta: torch.Tensor, theta_max: torch.Tensor | None = None
) -> torch.Tensor:
    """``ratio = lgamma(x + theta) - lgamma(theta)``, recomputed in float64 (in place) where a
    float32 ``theta`` exceeds :data:`_LARGE_THETA` and ``x != 0``: each log-gamma is then
    about ``theta log theta``, and the difference of two such float32 numbers (and the
    rounding of ``x + theta``) loses the value (a log-pmf > 0 at ``theta = 1e8``). On a CPU
    only (elsewhere the check would synchronise with the host); a no-op unless some ``theta``
    is that large. ``theta_max``: ``theta``'s maximum, when ``theta`` is a gathered copy.
    """
    if ratio.dtype != torch.float32 or ratio.device.type != "cpu" or ratio.numel() == 0:
        return ratio
    largest = theta.detach().amax() if theta_max is None else theta_max
    if bool(largest <= _LARGE_THETA):  # not ``not >``: a NaN theta makes the maximum NaN
        return ratio
    ratio = ratio.contiguous()  # written through a flat view
    x, theta = x.detach().expand(ratio.shape), theta.detach().expand(ratio.shape)
    where = fastmath.flat_nonzero((theta > _LARGE_THETA) & (x != 0))
    x64 = x.reshape(-1)[where].double()
    theta64 = theta.reshape(-1)[where].double()
    exact = torch.lgamma(x64 + theta64) - torch.lgamma(theta64)
    ratio.reshape(-1)[where] = exact.to(ratio.dtype)
    return ratio


def _sparse_enough(x: torch.Tensor) -> bool:
    """Whether the NB log-pmf should visit only ``x``'s nonzeros: on a CPU, when the first
    65,536 entries are sparse enough (both paths give the same values)."""
    if x.device.type != "cpu":
        return False
    head = x.detach().reshape(-1)[: 1 << 16].numpy()
    return bool(np.count_nonzero(head) <= _SPARSE_ENOUGH * head.size)


def _digamma(z: torch.Tensor) -> torch.Tensor:
    r"""``digamma(z)`` for ``z > 0``, faster than ``torch.digamma`` on a CPU for large inputs.

    The recurrence :math:`\psi(z) = \psi(z + 6) - \sum_{k=0}^{5} 1 / (z + k)`, then the
    asymptotic series of :math:`\psi(w)` at :math:`w = z + 6` to :math:`w^{-10}` (truncation
    below :math:`10^{-9}`): about 25 vectorised operations, where ``torch.digamma`` evaluates
    element by element (51,200 values: 1.1 ms against 0.37 ms here on an AVX-512 CPU; 50,000
    digamma differences on an AVX2 one: 2.3 ms in float64 against 0.85). Relative error
    against ``torch.digamma`` in float64: below :math:`10^{-6}` in float32, :math:`10^{-11}` in
    float64.
    """
    return fastmath.log(z + 6.0).sub_(_digamma_tail(z))


def _digamma_tail(z: torch.Tensor) -> torch.Tensor:
    """``log(z + 6) - digamma(z)``: the recurrence's shift and the series of :func:`_digamma`,
    small (about ``6.5 / z``) where ``z`` is large."""
    w = z + 6.0
    shift = torch.reciprocal(z)
    step = z.clone()
    for _ in range(5):
        shift += step.add_(1.0).reciprocal()
    r = w.reciprocal()
    r2 = r.square()
    poly = r2 * (1 / 12 - r2 * (1 / 120 - r2 * (1 / 252 - r2 * (1 / 240 - r2 * (1 / 132)))))
    return shift.add_(r.mul_(0.5)).add_(poly)


# below this many values, the series' fixed cost (about 25 operations of a few microseconds
# each) exceeds torch's digamma in float64 (measured: 62 against 217 us for 2,000 values,
# equal at about 8,000)
_DIGAMMA_SERIES_FROM = 8192


def _digamma_ratio(
    x: torch.Tensor, theta: torch.Tensor, tail_theta: torch.Tensor | None = None
) -> torch.Tensor:
    r"""``digamma(x + theta) - digamma(theta)`` for ``x >= 0``, without the difference of two
    nearly equal float32 digammas: :math:`\log(1 + x / (\theta + 6))` plus the difference of
    :func:`_digamma_tail`, small terms where ``theta`` is large; exactly 0 at ``x = 0``.
    Fewer than :data:`_DIGAMMA_SERIES_FROM` values: torch's digammas in float64 (their
    difference keeps float32 accuracy up to ``theta`` of about ``1e8``).
    ``tail_theta``: ``_digamma_tail(theta)``, when known (e.g. per feature, gathered)."""
    if max(x.numel(), theta.numel()) < _DIGAMMA_SERIES_FROM:
        theta64 = theta.double()
        exact = torch.digamma(x.double() + theta64).sub_(torch.digamma(theta64))
        return exact.to(torch.promote_types(x.dtype, theta.dtype))
    if tail_theta is None:
        tail_theta = _digamma_tail(theta)
    return fastmath.log1p(x / (theta + 6.0)).add_(tail_theta).sub_(_digamma_tail(x + theta))


class _CompositionNBLogProb(torch.autograd.Function):
    r"""Entrywise :math:`\log NB(x; \mu, \theta)` with :math:`\mu = l\,\mathrm{softmax}(\eta)`,
    the same values as :func:`_nb_log_prob` and a hand-written gradient for ``eta`` and ``theta``.

    With :math:`t = \theta + \mu + \epsilon` and :math:`r = \mu / (\theta + \epsilon)`, the
    terms in :math:`x` vanish where :math:`x = 0`, so on sparse data only
    :math:`-\theta \log(1 + r)` is dense; the rest is computed on the nonzeros (the digamma
    difference by :func:`_digamma_ratio`, as in :func:`_nb_log_prob`; at many whole counts and
    one ``theta`` per feature the log-gamma terms and the digamma difference come from the
    tables of :class:`_WholeCounts`). The gradient:

    .. math::
        \frac{\partial}{\partial\mu} = \frac{x}{\mu+\epsilon} - \frac{\theta + x}{t},
        \qquad
        \frac{\partial}{\partial\theta} = -\log(1 + r) + \frac{r\,\theta}{t} - \frac{x}{t}
        + \psi(x+\theta) - \psi(\theta),

    and through the softmax :math:`g_\eta = a - \mathrm{softmax}(\eta) \sum_j a_j` with
    :math:`a = \mu\, \partial/\partial\mu`. About 16 passes over ``cells x features``
    forward and backward where autograd through the formula makes about 35: the likelihood
    of a 2,000-gene minibatch was a third of a CPU training step. ``eta``: cells x features;
    ``library``: cells x 1 (data, no gradient); ``theta``: 1 or cells rows.
    """

    @staticmethod
    def forward(ctx, eta, library, theta, x, eps):
        mu = torch.softmax(eta, -1).mul_(library)
        theta_eps = theta + eps
        t = mu + theta_eps
        ratio = mu / theta_eps
        log1p_ratio = fastmath.log1p(ratio)  # log t - log(theta + eps), without cancelling
        out = -theta * log1p_ratio
        ctx.eps, ctx.sparse = eps, _sparse_enough(x)
        if not ctx.sparse:
            ctx.whole = whole = _WholeCounts.of(x, None, theta)
            if whole is not None:
                lgamma_terms = whole.log_gamma()
            else:
                lgamma_terms = torch.lgamma(x + theta).sub_(torch.lgamma(theta))
                lgamma_terms = _large_theta_exact(lgamma_terms, x, theta)
                lgamma_terms -= torch.lgamma(x + 1)
            out += x * (fastmath.log(mu + eps) - fastmath.log(t)) + lgamma_terms
            ctx.save_for_backward(mu, t, ratio, log1p_ratio, theta, x, library)
            return out
        nonzero = fastmath.flat_nonzero(x)
        at = _Nonzeros(nonzero, out.shape[-1], theta.shape[0] == 1)
        xn, mun, tn = at.take(x), at.take(mu), at.take(t)
        ctx.whole = whole = _WholeCounts.of(xn, at.column, theta)
        if whole is not None:
            thetan = None
            lgamma_terms = whole.log_gamma()
        else:
            thetan = at.take_theta(theta)
            lgamma_terms = torch.lgamma(xn + thetan)
            lgamma_terms -= (
                at.take_theta(torch.lgamma(theta)) if at.per_feature else torch.lgamma(thetan)
            )
            largest = theta.amax() if at.per_feature else None  # per feature: fewer values
            lgamma_terms = _large_theta_exact(lgamma_terms, xn, thetan, largest)
            lgamma_terms -= torch.lgamma(xn + 1)
        counts = xn * (fastmath.log(mun + eps) - fastmath.log(tn)) + lgamma_terms
        out.reshape(-1).index_add_(0, nonzero, counts)
        ctx.at = at
        ctx.save_for_backward(mu, t, ratio, log1p_ratio, theta, library, xn, mun, tn, thetan)
        return out

    @staticmethod
    def backward(ctx, grad):
        eps = ctx.eps
        if ctx.sparse:
            mu, t, ratio, log1p_ratio, theta, library, xn, mun, tn, thetan = ctx.saved_tensors
        else:
            mu, t, ratio, log1p_ratio, theta, x, library = ctx.saved_tensors
        # log_prob(x).sum(-1) hands back one value per cell, expanded over the features
        if grad.dim() == 2 and grad.stride(-1) == 0:
            grad = grad[:, :1]
        g = torch.div(theta, t).mul_(grad)  # -grad * d/dmu where x = 0: grad * theta / t
        grad_theta = None
        if ctx.needs_input_grad[2]:
            # d/dtheta of -theta log1p(mu / (theta + eps)) = -log1p(ratio) + ratio * theta / t
            if theta.shape[0] == 1 and grad.shape[-1] == 1:
                grad_theta = (ratio * g).sum(0, keepdim=True) - grad.T @ log1p_ratio
            else:
                grad_theta = _to_rows(ratio * g - log1p_ratio * grad, theta)
        if ctx.sparse:
            at = ctx.at
            gn = at.take(grad) if grad.shape[-1] > 1 else at.take_row(grad)
            g.reshape(-1).index_add_(0, at.index, gn * xn * (1.0 / tn - 1.0 / (mun + eps)))
            if grad_theta is not None:
                if ctx.whole is not None:
                    digammas = ctx.whole.digamma_ratio()
                else:
                    per_feature = at.per_feature and len(xn) >= _DIGAMMA_SERIES_FROM
                    tail = at.take_theta(_digamma_tail(theta)) if per_feature else None
                    digammas = _digamma_ratio(xn, thetan, tail)
                at.add_to_theta(grad_theta, gn * (digammas - xn / tn))
        else:
            g -= grad * x * (1.0 / (mu + eps) - 1.0 / t)
            if grad_theta is not None:
                whole = ctx.whole
                digammas = _digamma_ratio(x, theta) if whole is None else whole.digamma_ratio()
                dense = grad * (digammas - x / t)
                grad_theta = grad_theta + _to_rows(dense, theta)
        # through mu = library * softmax(eta): g_eta = a - softmax * sum(a), a = -g * mu
        g.mul_(mu)
        total = g.sum(-1, keepdim=True) / library.clamp_min(torch.finfo(mu.dtype).tiny)
        grad_eta = g.addcmul_(mu, total, value=-1.0).neg_()
        return grad_eta, None, grad_theta, None, None


def _to_rows(grad: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """A cells x features gradient summed over the cells when ``theta`` has one row."""
    return grad.sum(0, keepdim=True) if theta.shape[0] == 1 else grad


class _Nonzeros:
    """The nonzero entries of a ``cells x features`` matrix (flat ``index``), and gathers at them.

    ``index_select`` rather than indexing: twice as fast on a CPU for 50,000 of 500,000.
    """

    def __init__(self, index: torch.Tensor, n_features: int, per_feature: bool) -> None:
        self.index, self.n_features, self.per_feature = index, n_features, per_feature
        self.column = index % n_features

    def take(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(-1).index_select(0, self.index)

    def take_row(self, column: torch.Tensor) -> torch.Tensor:
        """A ``cells x 1`` value at each nonzero's row."""
        return column.reshape(-1).index_select(
            0, torch.div(self.index, self.n_features, rounding_mode="floor")
        )

    def take_theta(self, theta: torch.Tensor) -> torch.Tensor:
        """``theta`` (one row per feature, or one per cell) at each nonzero."""
        return theta.reshape(-1).index_select(0, self.column if self.per_feature else self.index)

    def add_to_theta(self, grad_theta: torch.Tensor, values: torch.Tensor) -> None:
        where = self.column if self.per_feature else self.index
        grad_theta.reshape(-1).index_add_(0, where, values)


# whole counts below this come from the tables of :class:`_WholeCounts` (in the benchmark's
# data 92-99 % of the nonzero counts; the table costs ``features x 16`` logarithms)
_TABLE_COUNTS = 16


class _WholeCounts:
    r"""The NB's log-gamma terms at whole counts, looked up in per-feature tables.

    For a whole count :math:`x` and :math:`\theta > 0`,

    .. math::
        \log\frac{\Gamma(x+\theta)}{\Gamma(\theta)\,\Gamma(x+1)}
        = \sum_{k<x} \log\frac{\theta+k}{k+1},
        \qquad
        \psi(x+\theta) - \psi(\theta) = \sum_{k<x} \frac{1}{\theta+k},

    cumulative sums over :math:`k`, one column per feature. For :math:`x <` :data:`_TABLE_COUNTS`
    a lookup replaces three log-gamma functions (about 11 ns a value on a CPU) in the forward
    and the digamma difference (a 25-pass series or float64 digammas) in the backward; the few
    larger counts take the functions. The sums are exact where the difference of log-gammas
    loses digits (large ``theta``). ``x``: whole numbers; ``column``: each value's feature
    (``None``: ``x`` is ``cells x features``); ``theta``: ``1 x features``.
    """

    def __init__(
        self, x: torch.Tensor, column: torch.Tensor | None, theta: torch.Tensor, large: np.ndarray
    ) -> None:
        n_features = theta.shape[-1]
        shift, scale = _table_rows(theta.dtype)
        # row k + 1: (theta + k) / (k + 1); row 0: 1, so that the sums start at 0
        self.ratios = torch.addcmul(shift, theta.detach(), scale)
        self.shape, self.scale, self.column = x.shape, scale, column
        self.large = torch.from_numpy(large)
        if column is None:  # x is cells x features
            feature = self.large % n_features
            column = torch.arange(n_features, dtype=x.dtype)
        else:
            feature = column.index_select(0, self.large)
        self.x_large = x.reshape(-1).index_select(0, self.large)
        self.theta_large = theta.detach().reshape(-1).index_select(0, feature)
        # flat index count * features + feature (exact in float32 below 2^24)
        index = x.clamp_max(_TABLE_COUNTS - 1).mul_(n_features).add_(column)
        self.index = index.reshape(-1).to(torch.int64)

    @staticmethod
    def of(
        x: torch.Tensor, column: torch.Tensor | None, theta: torch.Tensor
    ) -> _WholeCounts | None:
        """The tables for ``x`` on a CPU, or ``None`` unless ``x`` holds whole numbers in
        ``[0, 2^24)``, at least :data:`_DIGAMMA_SERIES_FROM` of them (fewer: the tables'
        30-odd operations cost more than the functions), and ``theta`` one row (of fewer
        than ``2^20`` features: a float32 index)."""
        if (
            x.device.type != "cpu"
            or x.numel() < _DIGAMMA_SERIES_FROM
            or theta.dim() != 2
            or theta.shape[0] != 1
            or (column is None and x.shape[-1] != theta.shape[-1])
            or theta.shape[-1] * _TABLE_COUNTS >= 2**24
            or x.dtype not in _WHOLE_DTYPES
        ):
            return None
        values = x.detach().numpy()
        if not 0 <= values.min() <= values.max() < 2**24:
            return None  # a NaN fails too
        if not np.array_equal(np.trunc(values), values):
            return None
        large = np.flatnonzero(values >= _TABLE_COUNTS)
        return _WholeCounts(x.detach(), column, theta, large)

    def _lookup(self, table: torch.Tensor, large: torch.Tensor) -> torch.Tensor:
        values = table.reshape(-1).index_select(0, self.index)
        if len(self.large):
            values[self.large] = large.to(values.dtype)
        return values.view(self.shape)

    def log_gamma(self) -> torch.Tensor:
        """``lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)``."""
        table = fastmath.log(self.ratios).cumsum_(0)
        x, theta = self.x_large, self.theta_large
        ratio = _large_theta_exact(torch.lgamma(x + theta).sub_(torch.lgamma(theta)), x, theta)
        return self._lookup(table, ratio.sub_(torch.lgamma(x + 1)))

    def digamma_ratio(self) -> torch.Tensor:
        """``digamma(x + theta) - digamma(theta)``."""
        # 1 / (theta + k) = scale / ratio; row 0: 0
        table = torch.div(self.scale, self.ratios).cumsum_(0)
        return self._lookup(table, _digamma_ratio(self.x_large, self.theta_large))

    def per_feature(self, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Entry ``values`` summed per feature, into ``theta``'s ``shape``."""
        if self.column is None:
            return values.sum_to_size(shape)
        total = values.new_zeros(shape.numel()).index_add_(0, self.column, values)
        return total.view(shape)


class _WholeCountTerms(torch.autograd.Function):
    """:meth:`_WholeCounts.log_gamma` as a function of ``theta`` (one row), differentiated
    by :meth:`_WholeCounts.digamma_ratio`."""

    @staticmethod
    def forward(ctx, theta, whole):
        ctx.whole, ctx.theta_shape = whole, theta.shape
        return whole.log_gamma()

    @staticmethod
    def backward(ctx, grad):
        whole = ctx.whole
        return whole.per_feature(grad * whole.digamma_ratio(), ctx.theta_shape), None


_WHOLE_DTYPES = (torch.float32, torch.float64)


@functools.cache
def _table_rows(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``shift`` and ``scale``, columns: row 0 ``(1, 0)``, row ``k + 1``
    ``(k / (k + 1), 1 / (k + 1))``."""
    k = torch.arange(_TABLE_COUNTS - 1, dtype=torch.float64)
    shift = torch.cat([torch.ones(1, dtype=torch.float64), k / (k + 1)])
    scale = torch.cat([torch.zeros(1, dtype=torch.float64), 1 / (k + 1)])
    return shift.to(dtype).unsqueeze(1), scale.to(dtype).unsqueeze(1)


@torch.no_grad()
def _nb_sample(mu: torch.Tensor, theta: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Draw NB samples as a Gamma(theta, theta / mu)-Poisson mixture."""
    gamma = Gamma(theta, torch.ones_like(theta), validate_args=False).sample(shape)
    return torch.poisson(gamma * (mu / theta))


class NegativeBinomial(Distribution):
    r"""Negative binomial with mean ``mu`` and inverse dispersion ``theta``.

    .. math::
        \mathbb{E}[X] = \mu, \qquad \operatorname{Var}[X] = \mu + \mu^2 / \theta

    Parameters
    ----------
    mu
        Mean, ``mu > 0``.
    theta
        Inverse dispersion, ``theta > 0``.
    eps
        Numerical stability constant added inside logarithms.
    validate_args
        Passed to :class:`torch.distributions.Distribution`.
    """

    arg_constraints: dict = {}
    support = constraints.nonnegative_integer

    def __init__(
        self, mu: Param, theta: Param, eps: float = 1e-8, validate_args: bool = False
    ) -> None:
        self.mu, self.theta = broadcast_all(mu, theta)
        # theta as given (e.g. one row per feature): log_prob's theta-only terms are cheaper
        self._theta = theta if isinstance(theta, torch.Tensor) else self.theta
        self.eps = eps
        super().__init__(self.mu.shape, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    @property
    def variance(self) -> torch.Tensor:
        return self.mu + self.mu**2 / self.theta

    def sample(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        return _nb_sample(self.mu, self.theta, torch.Size(sample_shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return _nb_log_prob(value, self.mu, self._theta, self.eps)


class CompositionNegativeBinomial(NegativeBinomial):
    r"""Negative binomial with mean ``library * softmax(eta)`` (a count likelihood's mean).

    The distribution of :class:`NegativeBinomial` with ``mu = library * softmax(eta)``;
    :meth:`log_prob` differentiates ``eta`` and ``theta`` in closed form
    (:class:`_CompositionNBLogProb`) instead of through autograd's record of the formula.

    Parameters
    ----------
    eta
        Logits of the composition, cells x features.
    library
        Each cell's total count, cells x 1 (data: no gradient).
    theta
        Inverse dispersion, ``> 0``: one row per feature or one per cell.
    eps
        Numerical stability constant added inside logarithms.
    """

    def __init__(
        self, eta: torch.Tensor, library: torch.Tensor, theta: torch.Tensor, eps: float = 1e-8
    ) -> None:
        self.eta, self.library, self._theta, self.eps = eta, library, theta, eps
        self.theta = theta.expand(eta.shape)
        Distribution.__init__(self, eta.shape, validate_args=False)

    @lazy_property
    def mu(self) -> torch.Tensor:
        return self.library * torch.softmax(self.eta, dim=-1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        # the fused path takes theta with one row per feature or per cell, every feature
        # (a cells x 1 or 1 x 1 theta broadcasts: the generic formula), and computes in
        # eta's dtype (float64 counts with a float32 eta: the generic formula, which promotes)
        shapes_fit = (
            torch.promote_types(value.dtype, self.eta.dtype) == self.eta.dtype
            and self.eta.dim() == 2
            and self._theta.dim() == 2
            and value.shape == self.eta.shape
            and self._theta.shape[-1] == self.eta.shape[-1]
            and self._theta.shape[0] in (1, self.eta.shape[0])
        )
        if self.library.requires_grad or not shapes_fit:
            return super().log_prob(value)
        return _CompositionNBLogProb.apply(self.eta, self.library, self._theta, value, self.eps)


class NegativeBinomialMixture(Distribution):
    r"""Two-component negative-binomial mixture with shared ``theta``.

    With :math:`w = \sigma(l)` the weight of component 1,

    .. math::
        \log p(x) = \operatorname{logsumexp}\big(
        \log\sigma(l) + \log NB(x; \mu_1, \theta),\;
        \log\sigma(-l) + \log NB(x; \mu_2, \theta)\big),

    :math:`\mathbb{E}[X] = w\mu_1 + (1-w)\mu_2`.

    Parameters
    ----------
    mu1, mu2
        Means of the two components, ``> 0``.
    theta
        Shared inverse dispersion, ``> 0``.
    mixture_logits
        Logits :math:`l` of the weight of component 1.
    eps
        Numerical stability constant added inside logarithms.
    validate_args
        Passed to :class:`torch.distributions.Distribution`.
    """

    arg_constraints: dict = {}
    support = constraints.nonnegative_integer

    def __init__(
        self,
        mu1: Param,
        mu2: Param,
        theta: Param,
        mixture_logits: Param,
        eps: float = 1e-8,
        validate_args: bool = False,
    ) -> None:
        self.mu1, self.mu2, self.theta, self.mixture_logits = broadcast_all(
            mu1, mu2, theta, mixture_logits
        )
        self._theta = theta if isinstance(theta, torch.Tensor) else self.theta  # as in the NB
        self.eps = eps
        super().__init__(self.mu1.shape, validate_args=validate_args)

    @property
    def mixture_probs(self) -> torch.Tensor:
        """Weight of component 1, ``sigmoid(mixture_logits)``."""
        return torch.sigmoid(self.mixture_logits)

    @property
    def mean(self) -> torch.Tensor:
        w = self.mixture_probs
        return w * self.mu1 + (1 - w) * self.mu2

    @property
    def variance(self) -> torch.Tensor:
        # E[X^2] of NB(mu, theta) is mu + mu^2 / theta + mu^2.
        w = self.mixture_probs
        second = [mu + mu**2 * (1 + 1 / self.theta) for mu in (self.mu1, self.mu2)]
        return w * second[0] + (1 - w) * second[1] - self.mean**2

    def sample(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            first = torch.rand(shape, dtype=self.mu1.dtype, device=self.mu1.device)
            first = first < self.mixture_probs
            mu = torch.where(first, self.mu1, self.mu2)
            return _nb_sample(mu, self.theta.expand(shape), torch.Size())

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        logits = self.mixture_logits
        lp1 = F.logsigmoid(logits) + _nb_log_prob(value, self.mu1, self._theta, self.eps)
        lp2 = F.logsigmoid(-logits) + _nb_log_prob(value, self.mu2, self._theta, self.eps)
        return torch.logaddexp(lp1, lp2)


class Log1pNormal(Distribution):
    r"""Distribution of :math:`X` with :math:`\log(1 + X) \sim N(\mathrm{loc}, \mathrm{scale}^2)`.

    .. math::
        \log p(x) = \log N(\log(1+x); \mathrm{loc}, \mathrm{scale}) - \log(1+x),
        \qquad \mathbb{E}[X] = e^{\mathrm{loc} + \mathrm{scale}^2/2} - 1

    Meant for ``log1p``-normalised, non-negative data.  The support is
    ``x > -1`` (``expm1`` of a normal draw can be negative), so that ``mean``,
    ``variance`` and ``sample`` are those of the untruncated distribution.

    Parameters
    ----------
    loc, scale
        Mean and standard deviation (``> 0``) of ``log1p(X)``.
    validate_args
        Passed to :class:`torch.distributions.Distribution`.
    """

    arg_constraints: dict = {}
    support = constraints.greater_than(-1.0)

    def __init__(self, loc: Param, scale: Param, validate_args: bool = False) -> None:
        self.loc, self.scale = broadcast_all(loc, scale)
        self._normal = Normal(self.loc, self.scale, validate_args=False)
        super().__init__(self.loc.shape, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return torch.expm1(self.loc + self.scale**2 / 2)

    @property
    def variance(self) -> torch.Tensor:
        s2 = self.scale**2
        return torch.expm1(s2) * torch.exp(2 * self.loc + s2)

    def sample(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        return torch.expm1(self._normal.sample(sample_shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        y = torch.log1p(value)
        return self._normal.log_prob(y) - y


class _ZeroInflated(Distribution):
    r"""Shared logic: point mass at zero with probability :math:`\pi = \sigma(l)`.

    Subclasses set ``self.base`` (a distribution on :math:`x \ge 0`) and
    ``self.zi_logits``.  If the base is discrete,

    .. math::
        \log p(0) = \operatorname{logsumexp}\big(\log\sigma(l),
        \log\sigma(-l) + \log p_\text{base}(0)\big);

    if it is continuous, :math:`\log p(0) = \log\sigma(l)` (a probability mass).
    For :math:`x > 0`, :math:`\log p(x) = \log\sigma(-l) + \log p_\text{base}(x)`.
    Moments:

    .. math::
        \mathbb{E}[X] = (1-\pi)\,\mathbb{E}_\text{base}, \qquad
        \operatorname{Var}[X] = (1-\pi)(\operatorname{Var}_\text{base}
        + \pi\,\mathbb{E}_\text{base}^2)
    """

    arg_constraints: dict = {}
    base: Distribution
    zi_logits: torch.Tensor

    @property
    def zi_probs(self) -> torch.Tensor:
        """Extra-zero probability ``sigmoid(zi_logits)``."""
        return torch.sigmoid(self.zi_logits)

    @property
    def mean(self) -> torch.Tensor:
        return (1 - self.zi_probs) * self.base.mean

    @property
    def variance(self) -> torch.Tensor:
        pi = self.zi_probs
        return (1 - pi) * (self.base.variance + pi * self.base.mean**2)

    def sample(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        with torch.no_grad():
            x = self.base.sample(sample_shape)
            zero = torch.rand_like(x) < self.zi_probs
            return torch.where(zero, torch.zeros_like(x), x)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        is_zero = value == 0
        log_pi = F.logsigmoid(self.zi_logits)
        log_not_pi = F.logsigmoid(-self.zi_logits)
        if self.base.support.is_discrete:
            base_lp = self.base.log_prob(value)
            zero_lp = torch.logaddexp(log_pi, log_not_pi + base_lp)
        else:
            # Evaluate the density at a safe point where value == 0 (it may be
            # infinite there), so the discarded branch has finite gradients.
            safe = torch.where(is_zero, torch.ones_like(value), value)
            base_lp = self.base.log_prob(safe)
            # log p(0) is free of the base, but a NaN base parameter must give a NaN term, as
            # it gives NaN gradients through the discarded branch (not a finite loss)
            zero_lp = torch.where(torch.isnan(base_lp), base_lp, log_pi)
        return torch.where(is_zero, zero_lp, log_not_pi + base_lp)


class ZeroInflatedNegativeBinomial(_ZeroInflated):
    r"""Zero-inflated negative binomial.

    :math:`X = 0` with probability :math:`\pi = \sigma(l)`, else
    :math:`X \sim NB(\mu, \theta)`; :math:`\mathbb{E}[X] = (1-\pi)\mu`.

    Parameters
    ----------
    mu, theta
        NB mean and inverse dispersion, both ``> 0``.
    zi_logits
        Logits :math:`l` of the extra-zero probability.
    eps
        Numerical stability constant added inside logarithms.
    validate_args
        Passed to :class:`torch.distributions.Distribution`.
    """

    support = constraints.nonnegative_integer

    def __init__(
        self,
        mu: Param,
        theta: Param,
        zi_logits: Param,
        eps: float = 1e-8,
        validate_args: bool = False,
    ) -> None:
        self.mu, self.theta, self.zi_logits = broadcast_all(mu, theta, zi_logits)
        self.eps = eps
        # theta as given: one row per feature keeps the per-feature log-gamma functions
        self.base = NegativeBinomial(self.mu, theta, eps=eps)
        super().__init__(self.mu.shape, validate_args=validate_args)


class ZeroInflatedLogNormal(_ZeroInflated):
    r"""Zero-inflated log-normal.

    :math:`X = 0` with probability :math:`\pi = \sigma(l)`, else
    :math:`\log X \sim N(\mathrm{loc}, \mathrm{scale}^2)`;
    :math:`\mathbb{E}[X] = (1-\pi)\,e^{\mathrm{loc} + \mathrm{scale}^2/2}`.

    Parameters
    ----------
    loc, scale
        Mean and standard deviation (``> 0``) of ``log X`` for non-zero ``X``.
    zi_logits
        Logits :math:`l` of the zero probability.
    validate_args
        Passed to :class:`torch.distributions.Distribution`.
    """

    support = constraints.nonnegative

    def __init__(
        self, loc: Param, scale: Param, zi_logits: Param, validate_args: bool = False
    ) -> None:
        self.loc, self.scale, self.zi_logits = broadcast_all(loc, scale, zi_logits)
        self.base = LogNormal(self.loc, self.scale, validate_args=False)
        super().__init__(self.loc.shape, validate_args=validate_args)


class ZeroInflatedGamma(_ZeroInflated):
    r"""Zero-inflated gamma.

    :math:`X = 0` with probability :math:`\pi = \sigma(l)`, else
    :math:`X \sim \mathrm{Gamma}(\alpha, \beta)` (shape :math:`\alpha`, rate
    :math:`\beta`); :math:`\mathbb{E}[X] = (1-\pi)\,\alpha/\beta`.

    Parameters
    ----------
    concentration, rate
        Gamma shape and rate, both ``> 0``.
    zi_logits
        Logits :math:`l` of the zero probability.
    validate_args
        Passed to :class:`torch.distributions.Distribution`.
    """

    support = constraints.nonnegative

    def __init__(
        self,
        concentration: Param,
        rate: Param,
        zi_logits: Param,
        validate_args: bool = False,
    ) -> None:
        self.concentration, self.rate, self.zi_logits = broadcast_all(
            concentration, rate, zi_logits
        )
        self.base = Gamma(self.concentration, self.rate, validate_args=False)
        super().__init__(self.concentration.shape, validate_args=validate_args)
