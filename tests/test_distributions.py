"""Tests for diagvi.distributions against scipy.stats references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from scipy.special import expit, logsumexp

from diagvi.distributions import (
    CompositionNegativeBinomial,
    Log1pNormal,
    NegativeBinomial,
    NegativeBinomialMixture,
    ZeroInflatedGamma,
    ZeroInflatedLogNormal,
    ZeroInflatedNegativeBinomial,
)

N = 8  # parameter draws per test
COUNTS = np.array([0, 1, 2, 5, 17, 100, 1000, 25000], dtype=np.float64)
REALS = np.array([0.0, 1e-3, 0.3, 1.0, 2.5, 40.0, 1e3], dtype=np.float64)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.float64)


def _grid(params: dict[str, np.ndarray], values: np.ndarray) -> tuple[dict, np.ndarray]:
    """Broadcast parameters of shape (N,) against values of shape (V,) to (N, V)."""
    return {k: v[:, None] for k, v in params.items()}, values[None, :]


def _nb_ref(x, mu, theta):
    return stats.nbinom.logpmf(x, theta, theta / (theta + mu))


def _nb_formula(x, mu, theta, eps=1e-8):
    """The NB log-pmf written out, for autograd (log-gamma and digamma functions)."""
    log_theta_mu = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu)
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def _draw(kind: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random parameters (shape (N,)) for each distribution kind."""

    def pos(lo: float, hi: float) -> np.ndarray:  # log-uniform on [lo, hi]
        return np.exp(rng.uniform(np.log(lo), np.log(hi), N))

    logits = rng.normal(0, 2, N)
    if kind == "nb":
        return {"mu": pos(0.05, 500), "theta": pos(0.1, 100)}
    if kind == "zinb":
        return {"mu": pos(0.05, 500), "theta": pos(0.1, 100), "zi_logits": logits}
    if kind == "nbm":
        return {
            "mu1": pos(0.05, 50),
            "mu2": pos(1, 500),
            "theta": pos(0.1, 100),
            "mixture_logits": logits,
        }
    if kind == "log1p":
        return {"loc": rng.normal(0, 1.5, N), "scale": pos(0.1, 2)}
    if kind == "ziln":
        return {"loc": rng.normal(0, 1.5, N), "scale": pos(0.1, 2), "zi_logits": logits}
    if kind == "zig":
        return {"concentration": pos(0.3, 10), "rate": pos(0.1, 10), "zi_logits": logits}
    raise ValueError(kind)


def _reference(kind: str, x: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    """scipy log-probabilities (same broadcasting as torch)."""
    if kind == "nb":
        return _nb_ref(x, p["mu"], p["theta"])
    if kind == "nbm":
        lw = np.log(expit(p["mixture_logits"]))
        l1w = np.log(expit(-p["mixture_logits"]))
        a = lw + _nb_ref(x, p["mu1"], p["theta"])
        b = l1w + _nb_ref(x, p["mu2"], p["theta"])
        return logsumexp(np.stack(np.broadcast_arrays(a, b)), axis=0)
    if kind == "log1p":
        y = np.log1p(x)
        return stats.norm.logpdf(y, p["loc"], p["scale"]) - y
    pi = expit(p["zi_logits"])
    if kind == "zinb":
        nb = _nb_ref(x, p["mu"], p["theta"])
        return np.where(x == 0, np.log(pi + (1 - pi) * np.exp(nb)), np.log1p(-pi) + nb)
    with np.errstate(divide="ignore"):
        if kind == "ziln":
            base = stats.lognorm.logpdf(x, s=p["scale"], scale=np.exp(p["loc"]))
        else:
            base = stats.gamma.logpdf(x, p["concentration"], scale=1 / p["rate"])
    return np.where(x == 0, np.log(pi), np.log1p(-pi) + base)


CLASSES = {
    "nb": NegativeBinomial,
    "zinb": ZeroInflatedNegativeBinomial,
    "nbm": NegativeBinomialMixture,
    "log1p": Log1pNormal,
    "ziln": ZeroInflatedLogNormal,
    "zig": ZeroInflatedGamma,
}
DISCRETE = {"nb", "zinb", "nbm"}


def _values(kind: str) -> np.ndarray:
    return COUNTS if kind in DISCRETE else REALS


@pytest.mark.parametrize("kind", list(CLASSES))
def test_log_prob_matches_scipy(kind: str) -> None:
    params = _draw(kind, _rng(1))
    p, x = _grid(params, _values(kind))
    dist = CLASSES[kind](**{k: _t(v) for k, v in p.items()})
    got = dist.log_prob(_t(x)).numpy()
    want = _reference(kind, x, p)
    assert got.shape == want.shape == (N, len(_values(kind)))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["zinb", "ziln", "zig"])
@pytest.mark.parametrize("pi", [0.01, 0.99])
def test_zero_inflation_extremes(kind: str, pi: float) -> None:
    params = _draw(kind, _rng(2))
    params["zi_logits"] = np.full(N, np.log(pi / (1 - pi)))
    p, x = _grid(params, _values(kind))
    dist = CLASSES[kind](**{k: _t(v) for k, v in p.items()})
    np.testing.assert_allclose(dist.zi_probs.numpy(), pi, rtol=1e-12)
    got = dist.log_prob(_t(x)).numpy()
    np.testing.assert_allclose(got, _reference(kind, x, p), rtol=1e-6, atol=1e-6)
    # The zero-mass is at least pi.
    assert np.all(got[:, 0] >= np.log(pi) - 1e-12)


@pytest.mark.parametrize("kind", list(CLASSES))
def test_mean_and_variance_match_samples(kind: str) -> None:
    torch.manual_seed(0)
    rng = _rng(3)
    params = _draw(kind, rng)
    # Keep the tails light enough for a Monte-Carlo check of the variance.
    if kind in {"log1p", "ziln"}:
        params["scale"] = rng.uniform(0.1, 0.6, N)
    if kind in DISCRETE:
        params["theta"] = rng.uniform(0.5, 20, N)
    for k in ("zi_logits", "mixture_logits"):
        if k in params:
            params[k] = rng.uniform(-2, 2, N)
    dist = CLASSES[kind](**{k: _t(v) for k, v in params.items()})
    samples = dist.sample((40000,))
    assert samples.shape == (40000, N)
    assert not samples.requires_grad
    if kind != "log1p":
        assert torch.all(samples >= 0)
    if kind in DISCRETE:
        assert torch.all(samples == samples.round())
    mean, var = dist.mean, dist.variance
    # Sample mean within 5 standard errors; sample variance within 25 %.
    z = (samples.mean(0) - mean) / torch.sqrt(var / samples.shape[0])
    assert torch.all(z.abs() < 5), z
    torch.testing.assert_close(samples.var(0), var, rtol=0.25, atol=1e-3)


@pytest.mark.parametrize("kind", list(CLASSES))
def test_gradients_finite_and_nonzero(kind: str) -> None:
    params = {k: _t(v).requires_grad_() for k, v in _draw(kind, _rng(4)).items()}
    values = _t(_values(kind))
    dist = CLASSES[kind](**{k: v[:, None] for k, v in params.items()})
    lp = dist.log_prob(values[None, :])
    grads = torch.autograd.grad(lp.sum(), list(params.values()))
    for name, g in zip(params, grads, strict=True):
        assert torch.all(torch.isfinite(g)), name
        assert torch.all(g != 0), name
    # At x == 0 alone every gradient must still be finite.
    zero_lp = CLASSES[kind](**params).log_prob(torch.zeros(N, dtype=torch.float64))
    zero_grads = torch.autograd.grad(zero_lp.sum(), list(params.values()), allow_unused=True)
    for name, g in zip(params, zero_grads, strict=True):
        assert g is None or torch.all(torch.isfinite(g)), name


def test_nb_gradient_at_zero_mean() -> None:
    mu = torch.tensor([0.0, 1e-12], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([2.0, 2.0], dtype=torch.float64, requires_grad=True)
    lp = NegativeBinomial(mu, theta).log_prob(torch.zeros(2, dtype=torch.float64))
    assert torch.all(torch.isfinite(lp))
    assert all(torch.all(torch.isfinite(g)) for g in torch.autograd.grad(lp.sum(), (mu, theta)))


@pytest.mark.parametrize("kind", list(CLASSES))
def test_batch_broadcasting(kind: str) -> None:
    params = _draw(kind, _rng(5))
    names = list(params)
    # First parameter varies over rows, the others over columns or are scalars.
    p = {names[0]: _t(params[names[0]][:3, None])}
    for i, k in enumerate(names[1:]):
        p[k] = _t(params[k][:5]) if i == 0 else float(params[k][0])
    dist = CLASSES[kind](**p)
    assert dist.batch_shape == (3, 5)
    assert dist.event_shape == ()
    assert dist.mean.shape == (3, 5)
    assert dist.variance.shape == (3, 5)
    assert dist.sample().shape == (3, 5)
    assert dist.sample((2,)).shape == (2, 3, 5)
    assert dist.log_prob(_t(_values(kind)[:5])).shape == (3, 5)
    assert dist.log_prob(torch.ones(4, 1, 1, dtype=torch.float64)).shape == (4, 3, 5)


@pytest.mark.parametrize("kind", list(CLASSES))
def test_support_and_no_validation(kind: str) -> None:
    cls = CLASSES[kind]
    assert cls.arg_constraints == {}
    assert cls.support.is_discrete == (kind in DISCRETE)
    dist = cls(**{k: _t(v) for k, v in _draw(kind, _rng(6)).items()})
    assert dist._validate_args is False


@pytest.mark.parametrize("theta_rows", [1, 64])  # one theta per feature, or per cell
def test_nb_log_prob_on_nonzeros_equals_the_dense_formula_with_its_gradients(theta_rows):
    """The CPU path computes the count terms on nonzero entries only; same values, same grads."""
    from diagvi.distributions import _nb_log_prob

    gen = torch.Generator().manual_seed(0)
    # float64: the dense formula's own theta gradient loses digits in float32
    x = torch.poisson(torch.rand(64, 30, generator=gen, dtype=torch.float64) * 0.3)
    assert 0.05 < (x > 0).float().mean() < 0.5  # mostly zeros
    mu = (torch.rand(64, 30, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    theta = torch.rand(theta_rows, 30, generator=gen, dtype=torch.float64) + 0.2
    theta.requires_grad_()
    eps = 1e-8
    got, want = _nb_log_prob(x, mu, theta, eps), _nb_formula(x, mu, theta, eps)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got.sum(), (mu, theta))
    torch.testing.assert_close(grads, torch.autograd.grad(want.sum(), (mu, theta)))


@pytest.mark.parametrize("density", [0.1, 0.9])  # the nonzeros-only path and the dense one
@pytest.mark.parametrize("theta_rows", [1, 48])  # one theta per feature, or per cell
def test_composition_nb_matches_autograd_through_the_formula(theta_rows, density):
    """Closed-form gradients of ``log NB(x; l softmax(eta), theta)`` equal autograd's."""
    from diagvi.distributions import CompositionNegativeBinomial

    gen = torch.Generator().manual_seed(1)
    shape = (48, 40)
    x = torch.poisson(torch.rand(shape, generator=gen, dtype=torch.float64) * 4)
    x = x * (torch.rand(shape, generator=gen, dtype=torch.float64) < density)
    x[0] = 0.0  # a cell without counts: library 0
    library = x.sum(-1, keepdim=True)
    eta = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    theta = torch.rand(theta_rows, shape[1], generator=gen, dtype=torch.float64) + 0.2
    theta.requires_grad_()
    weights = torch.rand(shape, generator=gen, dtype=torch.float64)  # a general upstream grad

    fused = CompositionNegativeBinomial(eta, library, theta)
    reference = NegativeBinomial(library * torch.softmax(eta, -1), theta)
    got, want = fused.log_prob(x), reference.log_prob(x)
    torch.testing.assert_close(got, want)
    assert torch.isfinite(got).all()
    for weigh in (lambda lp: (lp * weights).sum(), lambda lp: lp.sum(-1) @ weights[:, 0]):
        # a general upstream gradient, and one value per cell (how the loss sums it)
        grads = torch.autograd.grad(weigh(got), (eta, theta), retain_graph=True)
        expected = torch.autograd.grad(weigh(want), (eta, theta), retain_graph=True)
        torch.testing.assert_close(grads, expected)
    torch.testing.assert_close(fused.mean, reference.mean)


@pytest.mark.parametrize("kind", ["composition", "plain", "zinb"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("density", [0.24, 0.9])  # the nonzeros-only path and the dense one
def test_nb_at_whole_counts_equals_the_formula_with_its_gradients(density, dtype, kind):
    """Enough whole counts take the per-feature tables (counts >= 16 the functions); the
    log-pmf equals the float64 formula's (and scipy's) and the gradients autograd's through
    it, from overdispersed to nearly Poisson features. In float32 the tables are exact where
    log-gamma differences lose digits (``theta`` of thousands)."""
    from diagvi.distributions import _DIGAMMA_SERIES_FROM, _TABLE_COUNTS, _WholeCounts

    gen = torch.Generator().manual_seed(4)
    shape = (256, 160)
    x = torch.poisson(torch.rand(shape, generator=gen, dtype=torch.float64) * 12)
    x = x * (torch.rand(shape, generator=gen, dtype=torch.float64) < density)
    x[::9] *= 7  # some counts far above the tables
    library = x.sum(-1, keepdim=True)
    eta64 = torch.randn(shape, generator=gen, dtype=torch.float64)
    log_theta64 = torch.linspace(-4.0, 14.0, shape[1], dtype=torch.float64).unsqueeze(0)
    eta = eta64.to(dtype, copy=True).requires_grad_()
    log_theta = log_theta64.to(dtype, copy=True).requires_grad_()
    assert (x >= _TABLE_COUNTS).any() and (x != 0).sum() >= _DIGAMMA_SERIES_FROM
    assert _WholeCounts.of(x.to(dtype), None, log_theta) is not None

    zi_logits = torch.randn(1, shape[1], generator=gen, dtype=torch.float64)
    theta = log_theta.exp()
    mu = library.to(dtype) * torch.softmax(eta, -1)
    if kind == "composition":
        got = CompositionNegativeBinomial(eta, library.to(dtype), theta).log_prob(x.to(dtype))
    elif kind == "plain":
        got = NegativeBinomial(mu, theta).log_prob(x.to(dtype))
    else:
        got = ZeroInflatedNegativeBinomial(mu, theta, zi_logits.to(dtype)).log_prob(x.to(dtype))
    eta64.requires_grad_(), log_theta64.requires_grad_()
    mu64 = library * torch.softmax(eta64, -1)
    want = _nb_formula(x, mu64, log_theta64.exp())
    scipy = _nb_ref(x.numpy(), mu64.detach().numpy(), log_theta64.detach().exp().numpy())
    np.testing.assert_allclose(want.detach().numpy(), scipy, rtol=1e-6)  # eps in the logs
    if kind == "zinb":
        log_pi, log_not_pi = F.logsigmoid(zi_logits), F.logsigmoid(-zi_logits)
        zero = torch.logaddexp(log_pi, log_not_pi + want)
        want = torch.where(x == 0, zero, log_not_pi + want)
    error = (got.double() - want.detach()).abs()
    if dtype == torch.float64:
        assert error.max() < 1e-8  # the formula: log-gammas of 1e6 (ulp 4e-9)
    else:  # above the tables, float32 log-gammas of x + theta (up to 2e5: ulp 0.016)
        assert error[x < _TABLE_COUNTS].max() < 1e-4 and error.max() < 2e-2

    weights = torch.rand(shape, generator=gen, dtype=torch.float64)
    expected = torch.autograd.grad((want * weights).sum(), (eta64, log_theta64))
    grads = torch.autograd.grad((got * weights.to(dtype)).sum(), (eta, log_theta))
    # float64: the formula's own error at theta = 1e6 (against mpmath: 6.7e-7 for the largest
    # theta gradient, the tables 3.6e-10); float32, plain and ZINB: autograd through the other
    # terms, up to 4e-4 at theta of 5e4, with the tables or without
    limit = 2e-6 if dtype == torch.float64 else (1e-4 if kind == "composition" else 1e-3)
    for g, e in zip(grads, expected, strict=True):
        assert ((g.double() - e).abs() / e.abs().clamp_min(1.0)).max() < limit


def test_whole_count_tables_only_for_whole_counts():
    from diagvi.distributions import _WholeCounts

    theta = torch.ones(1, 100)
    counts = torch.poisson(torch.full((100, 100), 3.0))
    assert _WholeCounts.of(counts, None, theta) is not None
    for bad in (0.5, -1.0, float("nan"), float("inf")):
        x = counts.clone()
        x[7, 3] = bad
        assert _WholeCounts.of(x, None, theta) is None, bad
    assert _WholeCounts.of(counts, None, torch.ones(100, 100)) is None  # theta per cell
    assert _WholeCounts.of(counts[:10], None, theta) is None  # too few to pay


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_digamma_matches_torch(dtype):
    from diagvi.distributions import _digamma

    gen = torch.Generator().manual_seed(2)
    z = torch.cat(
        [
            torch.rand(2000, generator=gen, dtype=dtype) * 3 + 1e-3,  # the recurrence
            torch.rand(2000, generator=gen, dtype=dtype) * 500 + 0.5,  # the series
            torch.arange(1, 200, dtype=dtype) + 0.25,  # counts + theta
        ]
    )
    want = torch.digamma(z.double())
    relative = ((_digamma(z).double() - want).abs() / want.abs().clamp_min(1.0)).max()
    assert relative < (2e-6 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("n", [500, 20_000])  # torch's digamma in float64; the series
def test_digamma_ratio_keeps_float32_accuracy(n):
    from diagvi.distributions import _DIGAMMA_SERIES_FROM, _digamma_ratio

    assert (n < _DIGAMMA_SERIES_FROM) == (n == 500)
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 50, (n,), generator=gen).float()
    # from strongly overdispersed to nearly Poisson genes, where the two digammas nearly cancel
    theta = 10.0 ** (torch.rand(n, generator=gen) * 9 - 2)
    got = _digamma_ratio(x, theta)
    assert got.dtype == torch.float32 and torch.equal(got[x == 0], torch.zeros_like(got[x == 0]))
    want = torch.digamma(x.double() + theta.double()) - torch.digamma(theta.double())
    relative = ((got.double() - want).abs() / want.abs().clamp_min(1e-30))[x > 0].max()
    assert relative < 1e-5
    # theta per feature, broadcast over the cells as the likelihood's dense path has it
    cells = torch.randint(0, 5, (4, 3), generator=gen).float()
    features = torch.tensor([[0.5, 40.0, 3e5]])
    wide = torch.digamma(cells.double() + features.double()) - torch.digamma(features.double())
    torch.testing.assert_close(_digamma_ratio(cells, features).double(), wide, rtol=1e-5, atol=0)


def test_nb_per_cell_theta_when_cells_equal_features():
    """A cells x 1 theta is per cell even when there are as many cells as features."""
    mu = _t(np.arange(1.0, 10.0).reshape(3, 3))
    theta = _t(np.array([[0.5], [2.0], [10.0]]))
    x = torch.zeros(3, 3, dtype=torch.float64)
    x[0, 1] = 3.0  # sparse: the nonzeros-only path
    got = NegativeBinomial(mu, theta).log_prob(x).numpy()
    n, p = theta.numpy(), theta.numpy() / (theta.numpy() + mu.numpy())
    np.testing.assert_allclose(got, stats.nbinom.logpmf(x.numpy(), n, p), rtol=1e-6)


@pytest.mark.parametrize("value", [0.0, 2.0])
def test_count_log_prob_of_scalars(value):
    t = torch.tensor
    want = stats.nbinom.logpmf(value, 3.0, 3.0 / 5.0)
    got = NegativeBinomial(t(2.0), t(3.0)).log_prob(t(value))
    assert got.dim() == 0 and np.isclose(got.item(), want, rtol=1e-5)
    zinb = ZeroInflatedNegativeBinomial(t(2.0), t(3.0), t(-30.0)).log_prob(t(value))
    mixture = NegativeBinomialMixture(t(2.0), t(2.0), t(3.0), t(0.0)).log_prob(t(value))
    assert np.isclose(zinb.item(), want, rtol=1e-5) and np.isclose(mixture.item(), want, rtol=1e-5)


def test_mixture_samples_on_the_parameters_device():
    meta = torch.ones(4, 3, device="meta")
    assert NegativeBinomialMixture(meta, meta, meta, meta).sample().device.type == "meta"


@pytest.mark.parametrize("kind", ["composition", "plain"])
@pytest.mark.parametrize("density", [0.1, 0.9])  # the nonzeros-only path and the dense one
def test_nb_float32_theta_gradient_close_to_poisson(kind, density):
    """Genes near Poisson (theta >> mu): float32 keeps the log-pmf and the theta gradient.

    Written as ``theta log theta - theta log(theta + mu)`` and ``digamma(x + theta) -
    digamma(theta)``, float32 lost both (log-pmf > 0 at x = 0; the gradient of half the
    features had the wrong sign).
    """
    gen = torch.Generator().manual_seed(0)
    cells, features, theta0 = 256, 200, 300.0
    lib = torch.full((cells, 1), 0.5 * features / density * 0.2, dtype=torch.float64)
    eta = torch.randn(cells, features, generator=gen, dtype=torch.float64) * 0.3
    mu = lib * torch.softmax(eta, -1)
    x = NegativeBinomial(mu, torch.tensor(theta0, dtype=torch.float64)).sample()
    if density > 0.5:
        x = x + torch.poisson(torch.full_like(x, 2.0))  # mostly nonzero
        mu = mu + 2.0
        lib = mu.sum(-1, keepdim=True)

    def grad(dtype):
        log_theta = torch.full((1, features), np.log(theta0), dtype=dtype, requires_grad=True)
        e = torch.log(mu / lib).to(dtype)
        if kind == "composition":
            lp = CompositionNegativeBinomial(e, lib.to(dtype), log_theta.exp()).log_prob(
                x.to(dtype)
            )
        else:
            lp = NegativeBinomial(mu.to(dtype), log_theta.exp()).log_prob(x.to(dtype))
        lp.sum(-1).mean().backward()
        return log_theta.grad.double().reshape(-1), lp.detach().double()

    (g32, lp32), (g64, lp64) = grad(torch.float32), grad(torch.float64)
    assert ((g32 - g64).norm() / g64.norm()).item() < 0.02
    assert (g32.sign() == g64.sign()).double().mean() > 0.98
    assert (lp32 - lp64).abs().max() < 1e-2 and (lp32 <= 0).all()


def test_nb_log_pmf_of_zero_for_huge_theta():
    mu, theta = torch.tensor([[1.0]]), torch.tensor([[1e8]])
    assert np.isclose(
        NegativeBinomial(mu, theta).log_prob(torch.zeros(1, 1)).item(), -1.0, atol=1e-4
    )
