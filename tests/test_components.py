"""Tests for the registered model components, the registries, loss weighting and DiagVAE.

Every component kind is tested by iterating its registry, so a newly registered class is
covered without editing this file.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from geomloss import SamplesLoss
from torch import nn
from torch.distributions import Distribution, Normal, kl_divergence

import diagvi  # noqa: F401  (fills the registries)
from diagvi.components.alignment import UnbalancedSinkhorn, adaptive_blur
from diagvi.components.graph_encoders import graph_loss, signed_gcn_norm
from diagvi.components.likelihoods import Likelihood
from diagvi.data import DataSpec, ModalitySetup, read_modalities
from diagvi.errors import DataError
from diagvi.graph import build_guidance_graph, graph_from_mapping
from diagvi.lit import DEFAULT_WEIGHTS, WEIGHT_OF_TERM, DiagVILightning, weigh
from diagvi.module import DiagVAE
from diagvi.registry import (
    ALIGNMENTS,
    CLASSIFIERS,
    GRAPH_ENCODERS,
    LIKELIHOODS,
    PRIORS,
    Registry,
)
from diagvi.synthetic import make_synthetic_pair

N_CELLS, N_FEATURES, N_BATCHES = 5, 7, 2
BATCH = torch.tensor([0, 1, 0, 1, 1])  # both batches present
OT_ALIGNMENTS = [n for n in ALIGNMENTS if issubclass(ALIGNMENTS.get(n), UnbalancedSinkhorn)]
# transport on the raw cost (no per-minibatch rescaling) where the option exists
RAW_COST = (
    {"scale_cost": None}
    if "scale_cost" in inspect.signature(UnbalancedSinkhorn.__init__).parameters
    else {}
)


def assert_grads(module: nn.Module, what: str = "") -> None:
    """Every parameter of ``module`` received a finite, not-all-zero gradient."""
    params = dict(module.named_parameters())
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing, f"{what}: no gradient reached {missing}"
    bad = [n for n, p in params.items() if not torch.isfinite(p.grad).all()]
    assert not bad, f"{what}: non-finite gradient in {bad}"
    zero = [n for n, p in params.items() if not p.grad.abs().sum() > 0]
    assert not zero, f"{what}: all-zero gradient in {zero}"


def total_graph_loss(loss) -> torch.Tensor:
    """A graph encoder's loss: a scalar, or a dict of named scalar parts."""
    if isinstance(loss, dict):
        assert loss, "graph encoder returned no loss terms"
        for name, value in loss.items():
            assert value.dim() == 0 and torch.isfinite(value), name
        return sum(loss.values())
    return loss


# ----------------------------------------------------------------------------- likelihoods


def likelihood_data(cls: type, seed: int = 0) -> torch.Tensor:
    """Valid data for ``cls``: counts, non-negative reals with zeros, or reals."""
    g = torch.Generator().manual_seed(seed)
    shape = (N_CELLS, N_FEATURES)
    if cls.counts:
        x = torch.poisson(torch.rand(shape, generator=g) * 6.0, generator=g)
        x[:, 0] = 0.0  # a zero in every cell
        x[:, 1] += 1.0  # and a positive count in every cell (library > 0)
        return x
    if cls.nonnegative:
        x = torch.rand(shape, generator=g) * 3.0
        x[:, 0] = 0.0
        return x
    return torch.randn(shape, generator=g) * 2.0


@pytest.mark.parametrize("name", list(LIKELIHOODS))
def test_likelihood_log_prob_mean_and_gradients(name):
    torch.manual_seed(0)
    cls = LIKELIHOODS.get(name)
    assert issubclass(cls, Likelihood)
    lik = LIKELIHOODS.build(name, n_features=N_FEATURES, n_batches=N_BATCHES)
    eta = torch.randn(N_CELLS, N_FEATURES, requires_grad=True)
    x = likelihood_data(cls)
    library = x.sum(-1, keepdim=True)
    px = lik(eta, BATCH, library)
    assert isinstance(px, Distribution)

    lp = px.log_prob(x)
    assert lp.shape == (N_CELLS, N_FEATURES)
    assert torch.isfinite(lp).all()
    mean = px.mean
    assert mean.shape == (N_CELLS, N_FEATURES)
    assert torch.isfinite(mean).all()
    if cls.nonnegative:
        # Log1pNormal's support is x > -1 (untruncated), the others' x >= 0
        lower = getattr(px.support, "lower_bound", 0.0)
        assert (mean >= lower).all(), mean

    (-lp.sum()).backward()
    assert eta.grad is not None and torch.isfinite(eta.grad).all()
    assert eta.grad.abs().sum() > 0
    assert_grads(lik, name)
    for pname, p in lik.named_parameters():
        assert p.shape == (N_BATCHES, N_FEATURES), pname
        # every batch's row is used by the cells of that batch
        assert (p.grad.abs().sum(-1) > 0).all(), f"{name}.{pname}: a batch row got no gradient"


@pytest.mark.parametrize("name", list(LIKELIHOODS))
def test_likelihood_batch_parameters_are_per_batch(name):
    """Changing batch 1's parameters changes only the cells of batch 1."""
    lik = LIKELIHOODS.build(name, n_features=N_FEATURES, n_batches=N_BATCHES)
    eta = torch.randn(N_CELLS, N_FEATURES)
    x = likelihood_data(LIKELIHOODS.get(name))
    library = x.sum(-1, keepdim=True)
    before = lik(eta, BATCH, library).log_prob(x)
    with torch.no_grad():
        for p in lik.parameters():
            p[1] += 0.7
    after = lik(eta, BATCH, library).log_prob(x)
    in_b1 = BATCH == 1
    torch.testing.assert_close(after[~in_b1], before[~in_b1])
    if list(lik.parameters()):
        assert not torch.allclose(after[in_b1], before[in_b1])


@pytest.mark.parametrize("name", list(LIKELIHOODS))
def test_likelihood_transform(name):
    cls = LIKELIHOODS.get(name)
    lik = LIKELIHOODS.build(name, n_features=N_FEATURES, n_batches=N_BATCHES)
    x = likelihood_data(cls)
    library = x.sum(-1, keepdim=True)
    out = lik.transform(x, library)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    if cls.counts:
        torch.testing.assert_close(out, torch.log1p(x * 1e4 / library))
        # depth normalisation: the same composition at twice the depth looks the same
        torch.testing.assert_close(lik.transform(2 * x, 2 * library), out)
    elif cls.nonnegative:
        torch.testing.assert_close(out, torch.log1p(x))
    else:
        torch.testing.assert_close(out, x)


@pytest.mark.parametrize("name", list(LIKELIHOODS))
def test_likelihood_library_dependence(name):
    """Count means scale with the library; continuous likelihoods ignore it."""
    cls = LIKELIHOODS.get(name)
    lik = LIKELIHOODS.build(name, n_features=N_FEATURES, n_batches=N_BATCHES)
    eta = torch.randn(N_CELLS, N_FEATURES)
    library = torch.tensor([[10.0], [50.0], [3.0], [200.0], [1.0]])
    m1 = lik(eta, BATCH, library).mean
    m2 = lik(eta, BATCH, 3 * library).mean
    if cls.counts:
        torch.testing.assert_close(m2, 3 * m1)
    else:
        torch.testing.assert_close(m2, m1)


@pytest.mark.parametrize("name", ["nb", "nbmixture"])
def test_count_mean_is_library_times_composition(name):
    """Imputed values (the mean) sum to the library: the target library size is kept."""
    lik = LIKELIHOODS.build(name, n_features=N_FEATURES, n_batches=N_BATCHES)
    with torch.no_grad():  # parameters away from their start
        for p in lik.parameters():
            p.add_(torch.randn(p.shape))
    eta = torch.randn(N_CELLS, N_FEATURES)
    library = torch.tensor([[10.0], [50.0], [3.0], [200.0], [1.0]])
    mean = lik(eta, BATCH, library).mean
    torch.testing.assert_close(mean.sum(-1, keepdim=True), library)
    torch.testing.assert_close(mean, library * torch.softmax(eta, -1))


@pytest.mark.parametrize("name", list(LIKELIHOODS))
def test_initial_eta_puts_the_likelihood_at_the_data_average(name):
    """The decoder starts at the features' levels: at ``eta = initial_eta(average)`` the
    likelihood's location is the data's average (counts: the mean composition)."""
    lik = LIKELIHOODS.build(name, n_features=N_FEATURES, n_batches=1)
    g = torch.Generator().manual_seed(0)
    levels = torch.tensor([0.1, 1.0, 5.0, 40.0, 300.0][:N_FEATURES] + [2.0] * (N_FEATURES - 5))
    x = torch.poisson(levels.expand(60, -1), generator=g).double()
    sums = [lik.location_sums(part) for part in (x[:25], x[25:])]  # chunks add up
    average = (sums[0][0] + sums[1][0]) / (sums[0][1] + sums[1][1])
    eta = lik.initial_eta(average.float()).expand(N_CELLS, -1)
    px = lik(eta, torch.zeros(N_CELLS, dtype=torch.long), torch.full((N_CELLS, 1), 1000.0))
    nonzero = [x[:, j][x[:, j] > 0] for j in range(N_FEATURES)]
    expected = {
        "counts": (x / x.sum(1, keepdim=True)).mean(0) * 1000.0,
        "normal": x.mean(0),
        "log1pnormal": torch.log1p(x).mean(0),
        "ziln": torch.stack([v.log().mean() for v in nonzero]),
        "zig": torch.stack([v.mean() for v in nonzero]),
    }
    if lik.counts:
        got, want = px.mean[0] if name != "zinb" else px.base.mean[0], expected["counts"]
    elif name in ("normal", "log1pnormal", "ziln"):
        got, want = eta[0], expected[name]
    else:
        got, want = F.softplus(eta[0]), expected["zig"]
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    if name == "nbmixture":  # the foreground weight starts at 1/2 whatever the level
        torch.testing.assert_close(px.mixture_probs[0], torch.full((N_FEATURES,), 0.5))


# ----------------------------------------------------------------------------- priors

N_LATENT, N_LABELS = 3, 4
LABELS = torch.tensor([0, 1, 2, 3, -1, -1])


def posterior(n: int = 6, seed: int = 0) -> tuple[Normal, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(n, N_LATENT, generator=g).requires_grad_()
    scale = (0.5 + torch.rand(n, N_LATENT, generator=g)).requires_grad_()
    qz = Normal(loc, scale)
    z = loc + scale * torch.randn(n, N_LATENT, generator=g)
    return qz, z, loc


@pytest.mark.parametrize("name", list(PRIORS))
def test_prior_kl_shape_and_gradients(name):
    torch.manual_seed(0)
    prior = PRIORS.build(name, N_LATENT, N_LABELS)
    qz, z, loc = posterior()
    for labels in (LABELS, None, torch.full((6,), -1), torch.tensor([0, 1, 2, 3, 0, 1])):
        kl = prior.kl(qz, z, labels)
        assert kl.shape == (6,)
        assert torch.isfinite(kl).all()
    prior.kl(qz, z, LABELS).sum().backward()
    assert loc.grad is not None and torch.isfinite(loc.grad).all()
    assert_grads(prior, name)


def test_normal_prior_is_closed_form_kl():
    if "normal" not in PRIORS:
        pytest.skip("no 'normal' prior registered")
    prior = PRIORS.build("normal", N_LATENT, N_LABELS)
    qz, z, _ = posterior()
    expected = kl_divergence(qz, Normal(torch.zeros(6, N_LATENT), 1.0)).sum(-1)
    for labels in (LABELS, None):
        torch.testing.assert_close(prior.kl(qz, z, labels), expected)


@pytest.fixture
def gmm():
    if "gmm" not in PRIORS:
        pytest.skip("no 'gmm' prior registered")
    torch.manual_seed(0)
    prior = PRIORS.build("gmm", N_LATENT, N_LABELS)
    with torch.no_grad():  # identical components: every one matters to the marginal
        prior.means.zero_()
    return prior


def test_gmm_components(gmm):
    assert gmm.means.shape == (N_LABELS, N_LATENT)
    unlabelled = PRIORS.build("gmm", N_LATENT, 0, n_components=7)
    assert unlabelled.means.shape == (7, N_LATENT)


def test_gmm_labelled_cells_use_their_component(gmm):
    qz, z, _ = posterior()
    with torch.no_grad():
        base = gmm.kl(qz, z, LABELS)
        for k in range(N_LABELS):
            gmm.means[k] += 1.5
            moved = gmm.kl(qz, z, LABELS)
            gmm.means[k] -= 1.5
            for cell in range(4):  # cells 0..3 carry labels 0..3
                if cell == k:
                    assert not torch.isclose(moved[cell], base[cell]), (cell, k)
                else:
                    assert moved[cell] == base[cell], (cell, k)
            # unlabelled cells marginalise over every component
            assert not torch.isclose(moved[4], base[4]), k
            assert not torch.isclose(moved[5], base[5]), k


def test_gmm_labelled_value(gmm):
    qz, z, _ = posterior()
    with torch.no_grad():
        kl = gmm.kl(qz, z, LABELS)
        comp = gmm.components()
        log_pi = torch.log_softmax(gmm.logits, -1)
        for cell in range(4):
            y = int(LABELS[cell])
            q = Normal(qz.loc[cell], qz.scale[cell])
            expected = kl_divergence(q, Normal(comp.loc[y], comp.scale[y])).sum() - log_pi[y]
            torch.testing.assert_close(kl[cell], expected)
        # unlabelled cells equal the no-label (marginal) value
        torch.testing.assert_close(kl[4:], gmm.kl(qz, z, None)[4:])


def test_gmm_gradients_with_labelled_and_unlabelled(gmm):
    # (the fixture's identical components are a symmetric point where d/dlogits is 0)
    torch.manual_seed(1)
    gmm = PRIORS.build("gmm", N_LATENT, N_LABELS)
    qz, z, loc = posterior()
    gmm.kl(qz, z, LABELS).sum().backward()
    assert_grads(gmm, "gmm")
    # every component gets a gradient (labelled cells use one each, unlabelled all)
    assert (gmm.means.grad.abs().sum(-1) > 0).all()
    assert torch.isfinite(loc.grad).all()


# ----------------------------------------------------------------------------- graph encoders

GRAPH_FEATURES = {
    "rna": [f"g{i}" for i in range(6)],
    "protein": [f"p{i}" for i in range(4)],
}
GRAPH_MAPPING = pd.DataFrame(
    {
        "rna": ["g0", "g1", "g2", "g3", "g5"],
        "protein": ["p0", "p1", "p2", "p3", "p0"],
        "weight": [1.0, 0.5, 1.0, 0.8, 0.3],
        "sign": [1, 1, -1, 1, 1],
    }
)


@pytest.fixture
def small_graph():
    return graph_from_mapping(GRAPH_FEATURES, GRAPH_MAPPING)


@pytest.mark.parametrize("name", list(GRAPH_ENCODERS))
def test_graph_encoder_forward_loss_gradients(name, small_graph):
    torch.manual_seed(0)
    enc = GRAPH_ENCODERS.build(name, small_graph, 4)
    qv = enc()
    assert isinstance(qv, Normal)
    assert qv.loc.shape == (small_graph.num_nodes, 4) == (10, 4)
    assert qv.scale.shape == (10, 4) and (qv.scale > 0).all()
    v = qv.rsample()
    loss = total_graph_loss(enc.loss(qv, v))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert_grads(enc, name)


def test_graph_loss_sign():
    edge_index = torch.tensor([[0], [1]])
    weight = torch.ones(1)
    a = torch.tensor([2.0, -1.0, 1.5])
    aligned, anti = torch.stack([a, a]), torch.stack([a, -a])
    pos, neg = torch.ones(1), -torch.ones(1)
    loss = {
        (vname, sname): graph_loss(v, edge_index, weight, s, n_negative=0)
        for vname, v in (("aligned", aligned), ("anti", anti))
        for sname, s in (("pos", pos), ("neg", neg))
    }
    assert loss["aligned", "pos"] < loss["anti", "pos"]
    assert loss["aligned", "neg"] > loss["anti", "neg"]
    assert loss["aligned", "pos"] < 1e-3  # sigmoid(v_i . v_j) ~ 1 = target
    # the value is the BCE of sigmoid(v_i . v_j) against [s > 0]
    logit = (a * a).sum()
    expected = F.binary_cross_entropy_with_logits(logit, torch.tensor(0.0))
    torch.testing.assert_close(loss["aligned", "neg"], expected)


def test_graph_loss_weights():
    edge_index = torch.tensor([[0, 2], [1, 3]])
    sign = torch.ones(2)
    a, b = torch.tensor([2.0, 1.0]), torch.tensor([1.0, -2.0])
    v = torch.stack([a, a, b, -b])  # edge (0,1) satisfied, edge (2,3) violated
    low = graph_loss(v, edge_index, torch.tensor([1.0, 0.1]), sign, n_negative=0)
    high = graph_loss(v, edge_index, torch.tensor([1.0, 1.0]), sign, n_negative=0)
    assert low < high
    bce = F.binary_cross_entropy_with_logits(
        (v[[0, 2]] * v[[1, 3]]).sum(-1), torch.ones(2), reduction="none"
    )
    torch.testing.assert_close(low, (bce[0] + 0.1 * bce[1]) / 1.1)
    # the violated edge pulls on its endpoints harder the larger its weight
    pulls = []
    for w in (0.1, 1.0):
        vv = v.clone().requires_grad_()
        graph_loss(vv, edge_index, torch.tensor([1.0, w]), sign, n_negative=0).backward()
        pulls.append(vv.grad[2].norm())
    assert pulls[0] < pulls[1]


def test_graph_loss_negative_sampling():
    torch.manual_seed(0)
    v = torch.randn(6, 3, requires_grad=True)
    edge_index = torch.tensor([[0, 1, 2], [3, 4, 5]])
    w, s = torch.ones(3), torch.ones(3)
    one = graph_loss(v, edge_index, w, s, 5, torch.Generator().manual_seed(1))
    two = graph_loss(v, edge_index, w, s, 5, torch.Generator().manual_seed(1))
    assert torch.isfinite(one) and one.dim() == 0
    torch.testing.assert_close(one, two)
    # negatives add pairs with target 0, so the loss differs from the positive-only one
    assert not torch.isclose(one, graph_loss(v, edge_index, w, s, 0))
    one.backward()
    assert torch.isfinite(v.grad).all()


def test_signed_gcn_norm_formula():
    edge_index = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 0, 2, 1, 2]])
    weight = torch.tensor([1.0, 0.5, 0.5, 0.25, 0.25, 1.0])
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    # degrees: d0 = 1 + 0.5, d1 = 0.5 + 0.25, d2 = 0.25 + 1
    d = [1.5, 0.75, 1.25]
    expected = torch.tensor(
        [
            1.0 / math.sqrt(d[0] * d[0]),
            -0.5 / math.sqrt(d[0] * d[1]),
            -0.5 / math.sqrt(d[1] * d[0]),
            0.25 / math.sqrt(d[1] * d[2]),
            0.25 / math.sqrt(d[2] * d[1]),
            1.0 / math.sqrt(d[2] * d[2]),
        ]
    )
    torch.testing.assert_close(signed_gcn_norm(edge_index, weight, sign, 3), expected)


# ----------------------------------------------------------------------------- alignment


def clouds(seed: int = 0, n: int = 20, m: int = 25, d: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)


@pytest.mark.parametrize("name", list(ALIGNMENTS))
def test_alignment_returns_finite_scalar(name):
    x, y = clouds()
    x.requires_grad_()
    y = (y + 1.0).requires_grad_()
    out = ALIGNMENTS.build(name)({"a": x, "b": y})
    assert out.dim() == 0 and torch.isfinite(out)
    out.backward()  # connected to both inputs even when the term is constant
    assert x.grad is not None and y.grad is not None


@pytest.mark.parametrize("name", OT_ALIGNMENTS)
def test_sinkhorn_identity_shift_and_gradients(name):
    align = ALIGNMENTS.build(name)
    x, _ = clouds()
    same = align({"a": x, "b": x.clone()})
    assert abs(float(same)) < 1e-3  # de-biased: S(a, a) = 0
    y = x + torch.tensor([2.0, 0.0, 0.0])
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    shifted = align({"a": xg, "b": yg})
    assert shifted > same + 0.1
    shifted.backward()
    for g in (xg.grad, yg.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # farther apart costs more
    farther = align({"a": x, "b": x + torch.tensor([4.0, 0.0, 0.0])})
    assert farther > shifted


def hand_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|x_i - y_j|^2 / 2 with explicit broadcasting."""
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1) / 2


def test_adaptive_blur_matches_formula():
    x, y = clouds(n=30, m=40)
    c = hand_cost(x, y).double().flatten()
    mean = c.sum() / c.numel()
    std = torch.sqrt(((c - mean) ** 2).sum() / (c.numel() - 1))  # torch's (unbiased) std
    for scale in (0.05, 0.3):
        got = adaptive_blur(x, y, p=2, rule="mean", scale=scale)
        assert got == pytest.approx(float(scale * mean) ** 0.5, rel=1e-5)
        got = adaptive_blur(x, y, p=2, rule="std", scale=scale)
        assert got == pytest.approx(float(scale * std) ** 0.5, rel=1e-5)
    # p = 1: C = |x - y|, blur = epsilon
    dist = torch.cdist(x, y).double()
    assert adaptive_blur(x, y, p=1, rule="mean", scale=0.1) == pytest.approx(
        float(0.1 * dist.mean()), rel=1e-5
    )


@pytest.mark.parametrize("rule", ["mean", "std"])
def test_adaptive_blur_scale_equivariant(rule):
    x, y = clouds()
    base = adaptive_blur(x, y, p=2, rule=rule)
    for factor in (0.1, 3.0, 50.0):
        assert adaptive_blur(factor * x, factor * y, p=2, rule=rule) == pytest.approx(
            factor * base, rel=1e-4
        )


@pytest.mark.parametrize("scale_cost", [None, "mean"])
def test_blur_with_linked_features_is_that_of_the_whole_cost(scale_cost):
    """p = 2: the mean cost of ``[x, fx]`` and ``[y, fy]``, known without concatenating."""
    x, y = clouds(n=30, m=40)
    fx, fy = torch.randn(30, 7) * 3 + 1, torch.randn(40, 7)
    align = UnbalancedSinkhorn(feature_weight=0.3, scale_cost=scale_cost)
    x2, y2, fx2, fy2, mean = align._with_features(x, y, fx, fy)
    whole = hand_cost(torch.cat([x2, fx2], 1), torch.cat([y2, fy2], 1)).double().mean()
    assert float(mean) == pytest.approx(float(whole), rel=1e-5)
    # the feature part holds its share of the whole: w / (1 - w) times the latent part
    latent = hand_cost(x2, y2).double().mean()
    assert float(hand_cost(fx2, fy2).double().mean() / latent) == pytest.approx(0.3 / 0.7, rel=1e-4)
    whole_clouds = torch.cat([x2, fx2], 1), torch.cat([y2, fy2], 1)
    expected = adaptive_blur(*whole_clouds, p=2, scale=align.epsilon_scale)
    assert align.current_blur(x2, y2, mean=mean) == pytest.approx(expected, rel=1e-5)
    assert UnbalancedSinkhorn(p=1, feature_weight=0.3)._with_features(x, y, fx, fy)[-1] is None


def test_adaptive_blur_is_not_differentiated():
    x, y = clouds()
    x.requires_grad_()
    assert isinstance(adaptive_blur(x, y), float)


def test_unknown_rule_or_mode_raises():
    x, y = clouds()
    with pytest.raises(ValueError, match="median"):
        adaptive_blur(x, y, rule="median")
    with pytest.raises(ValueError, match="median"):
        UnbalancedSinkhorn(epsilon_rule="median")
    with pytest.raises(ValueError, match="bogus"):
        UnbalancedSinkhorn(blur_mode="bogus")


def max_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """The epsilon-scaling start our alignment gives GeomLoss (debias=True is its default)."""
    return float(torch.cdist(x, y).max())


def test_fixed_blur_and_reach_are_passed_to_geomloss():
    x, y = clouds()
    y = y + 0.5
    for reach_scale in (10.0, 2.0, None):
        align = UnbalancedSinkhorn(
            blur_mode="fixed", blur=0.3, reach_scale=reach_scale, schedule="geomloss", **RAW_COST
        )
        assert align.current_blur(x, y) == 0.3
        assert align.current_blur(10 * x, 10 * y) == 0.3  # independent of the data
        reach = None if reach_scale is None else reach_scale * 0.3
        ref = SamplesLoss(
            "sinkhorn", p=2, blur=0.3, reach=reach, scaling=0.5, diameter=max_distance(x, y)
        )
        torch.testing.assert_close(align({"a": x, "b": y}), ref(x, y))


def test_balanced_sinkhorn_has_no_reach():
    if "sinkhorn" not in ALIGNMENTS:
        pytest.skip("no 'sinkhorn' alignment registered")
    align = ALIGNMENTS.build(
        "sinkhorn", reach_scale=5.0, blur_mode="fixed", blur=0.2, schedule="geomloss", **RAW_COST
    )
    assert align.reach_scale is None
    x, y = clouds()
    ref = SamplesLoss("sinkhorn", p=2, blur=0.2, scaling=0.5, diameter=max_distance(x, y))
    torch.testing.assert_close(align({"a": x, "b": y}), ref(x, y))


@pytest.mark.skipif(not RAW_COST, reason="UnbalancedSinkhorn has no scale_cost option")
def test_scale_cost_mean():
    """``scale_cost="mean"``: transport between x / u, y / u with u = mean(C)^(1/p)."""
    x, y = clouds()
    y = y + 0.5
    align = UnbalancedSinkhorn(
        blur_mode="fixed", blur=0.3, reach_scale=10.0, scale_cost="mean", schedule="geomloss"
    )
    unit = hand_cost(x, y).mean().sqrt()
    diameter = max_distance(x / unit, y / unit)
    ref = SamplesLoss("sinkhorn", p=2, blur=0.3, reach=3.0, scaling=0.5, diameter=diameter)
    torch.testing.assert_close(align({"a": x, "b": y}), ref(x / unit, y / unit))
    # the divergence no longer depends on the scale of the latent space
    for name in OT_ALIGNMENTS:
        default = ALIGNMENTS.build(name, scale_cost="mean")
        base = default({"a": x, "b": y})
        for factor in (0.01, 7.0):
            scaled = default({"a": factor * x, "b": factor * y})
            torch.testing.assert_close(scaled, base, rtol=1e-4, atol=1e-6)
    # the scale is differentiated: shrinking both clouds together earns no gradient
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    align({"a": xg, "b": yg}).backward()
    radial = (xg.grad * x).sum() + (yg.grad * y).sum()  # d/dc of S(c x, c y) at c = 1
    assert abs(float(radial)) < 1e-4
    with pytest.raises(ValueError, match="median"):
        UnbalancedSinkhorn(scale_cost="median")


def test_annealed_blur_schedule():
    align = UnbalancedSinkhorn(blur_mode="annealed", blur=0.01, blur_start=1.0, anneal_steps=4)
    x, y = clouds(n=6, m=7)
    assert align.current_blur(x, y) == pytest.approx(1.0)
    align.train()
    expected = [0.01 ** (k / 4) for k in range(1, 5)] + [0.01, 0.01]
    for k, blur in enumerate(expected, start=1):
        align({"a": x, "b": y})
        assert int(align.step) == k
        assert align.current_blur(x, y) == pytest.approx(blur, rel=1e-6)
    # monotone decay from blur_start to blur
    assert all(a >= b for a, b in zip(expected, expected[1:], strict=False))
    # evaluation does not advance the schedule
    align.eval()
    align({"a": x, "b": y})
    assert int(align.step) == len(expected)
    # the step counter is state (checkpointed, so a resumed run continues the schedule)
    assert "step" in align.state_dict()
    fresh = UnbalancedSinkhorn(blur_mode="annealed", blur=0.01, blur_start=1.0, anneal_steps=4)
    fresh.load_state_dict(align.state_dict())
    assert fresh.current_blur(x, y) == pytest.approx(0.01)


# ----------------------------------------------------------------------------- classifiers


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_classifier_logits_and_loss(name):
    torch.manual_seed(0)
    clf = CLASSIFIERS.build(name, N_LATENT, N_LABELS).eval()  # no dropout noise
    z = torch.randn(6, N_LATENT)
    logits = clf(z)
    assert logits.shape == (6, N_LABELS)
    loss = clf.loss(z, LABELS)
    known = LABELS >= 0
    torch.testing.assert_close(loss, F.cross_entropy(logits[known], LABELS[known]))
    z2 = z.clone()
    z2[~known] = torch.randn(int((~known).sum()), N_LATENT) * 10
    torch.testing.assert_close(clf.loss(z2, LABELS), loss)
    z3 = z.clone()
    z3[0] += 3.0
    assert not torch.isclose(clf.loss(z3, LABELS), loss)

    clf.train()
    zg = z.clone().requires_grad_()
    clf.loss(zg, LABELS).backward()
    assert_grads(clf, name)
    assert (zg.grad[~known] == 0).all()


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_classifier_ignores_the_latent_scale(name):
    torch.manual_seed(0)
    clf = CLASSIFIERS.build(name, N_LATENT, N_LABELS)
    clf.head.apply(lambda m: m.eval())  # dropout off; the standardisation keeps batch stats
    z = torch.randn(32, N_LATENT)
    torch.testing.assert_close(clf(0.1 * z + 3.0), clf(z), atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="logit_scale"):
        CLASSIFIERS.build(name, N_LATENT, N_LABELS, logit_scale=0.0)


def test_classifier_needs_two_labelled_cells_in_training():
    clf = CLASSIFIERS.build("linear", N_LATENT, N_LABELS)
    z = torch.randn(4, N_LATENT, requires_grad=True)
    assert float(clf.loss(z, torch.tensor([1, -1, -1, -1])).detach()) == 0.0
    assert float(clf.eval().loss(z, torch.tensor([1, -1, -1, -1])).detach()) > 0.0


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_classifier_all_unlabelled(name):
    clf = CLASSIFIERS.build(name, N_LATENT, N_LABELS)
    z = torch.randn(6, N_LATENT, requires_grad=True)
    loss = clf.loss(z, torch.full((6,), -1))
    assert loss.dim() == 0 and float(loss.detach()) == 0.0
    assert loss.requires_grad  # connected to the graph
    loss.backward()
    assert z.grad is not None and (z.grad == 0).all()


# ----------------------------------------------------------------------------- registry


def test_registry_duplicate_registration_raises():
    reg = Registry("widget")

    @reg.register("a")
    class A:
        pass

    assert reg.get("a") is A and A.registry_name == "a" and "a" in reg
    with pytest.raises(KeyError, match="already registered"):
        reg.register("a")(type("B", (), {}))
    assert reg.get("a") is A
    for real in (LIKELIHOODS, PRIORS, GRAPH_ENCODERS, ALIGNMENTS, CLASSIFIERS):
        name = next(iter(real))
        cls = real.get(name)
        with pytest.raises(KeyError):
            real.register(name)(type("Dup", (), {}))
        assert real.get(name) is cls


@pytest.mark.parametrize("registry", [LIKELIHOODS, PRIORS, GRAPH_ENCODERS, ALIGNMENTS, CLASSIFIERS])
def test_registry_unknown_name_lists_known(registry):
    with pytest.raises(DataError) as err:
        registry.get("no_such_component")
    msg = str(err.value)
    assert "no_such_component" in msg
    known = list(registry)
    assert known
    for name in known:
        assert name in msg
    for name in known:  # every class knows its registered name
        assert registry.get(name).registry_name == name


def test_registry_refuses_a_name_that_is_not_a_string():
    # a list from a config (model.likelihood.rna=[nb]) hashed into a bare "unhashable type"
    with pytest.raises(DataError, match=r"likelihood name must be a string, got list \['nb'\]"):
        LIKELIHOODS.get(["nb"])
    assert ["nb"] not in LIKELIHOODS
    assert "nb" in LIKELIHOODS


# ----------------------------------------------------------------------------- weigh


def test_weigh_uses_the_weight_of_each_term_kind():
    weights = {
        "lam_data": 2.0,
        "lam_kl": 3.0,
        "lam_spread": 19.0,
        "lam_graph": 5.0,
        "lam_link": 13.0,
        "lam_self": 17.0,
        "lam_sinkhorn": 7.0,
        "lam_class": 11.0,
    }
    assert set(weights) == set(DEFAULT_WEIGHTS) == set(WEIGHT_OF_TERM.values())
    terms = {
        "nll/rna": torch.tensor(1.0),
        "nll/protein": torch.tensor(10.0),
        "kl/rna": torch.tensor(100.0),
        "kl/protein": torch.tensor(1000.0),
        "graph": torch.tensor(1e4),
        "graph/kl": torch.tensor(1e5),
        "align": torch.tensor(1e6),
        "cls/rna": torch.tensor(1e7),
        "link/rna": torch.tensor(1e8),
        "self/protein": torch.tensor(1e9),
        "spread/rna": torch.tensor(1e-3),
    }
    expected = 2 * 11 + 3 * 1100 + 5 * 1.1e5 + 7 * 1e6 + 11 * 1e7 + 13 * 1e8 + 17 * 1e9 + 19e-3
    assert float(weigh(terms, weights)) == pytest.approx(expected)
    for name, value in terms.items():  # each term alone gets exactly its own weight
        lam = weights[WEIGHT_OF_TERM[name.split("/")[0]]]
        assert float(weigh({name: value}, weights)) == pytest.approx(lam * float(value))
    with pytest.raises((KeyError, ValueError)):  # unknown kinds are not silently dropped
        weigh({"mystery": torch.tensor(1.0)}, weights)


def test_lightning_rejects_unknown_weights():
    with pytest.raises(ValueError, match="lam_typo"):
        DiagVILightning(nn.Linear(1, 1), {"lam_typo": 1.0})


# ----------------------------------------------------------------------------- DiagVAE


@pytest.fixture(scope="module")
def synthetic_spec():
    adatas, mapping = make_synthetic_pair(n_cells=48, n_genes=30, n_proteins=8, seed=0)
    setups = {
        "rna": ModalitySetup(labels_key="cell_type", likelihood="nb"),
        "protein": ModalitySetup(likelihood="nb"),
    }
    data, categories = read_modalities(adatas, setups)
    graph = build_guidance_graph({m: d.var_names for m, d in data.items()}, mapping=mapping)
    spec = DataSpec.from_data(data, categories, graph)
    batch = {m: d.rows(np.arange(32)) for m, d in data.items()}
    return spec, batch


def build_module(spec, protein="nb", prior="gmm", classifier=None, alignment="uot"):
    classifier = classifier or next(iter(CLASSIFIERS))
    return DiagVAE(
        spec,
        n_latent=4,
        likelihoods={"rna": LIKELIHOODS.get("nb"), "protein": LIKELIHOODS.get(protein)},
        prior=PRIORS.get(prior),
        graph_encoder=GRAPH_ENCODERS.get(next(iter(GRAPH_ENCODERS))),
        alignment=ALIGNMENTS.build(alignment),
        classifier=CLASSIFIERS.get(classifier),
        encoder={"n_hidden": 16, "n_layers": 1, "dropout": 0.0},
    )


def check_terms_and_gradients(module: DiagVAE, batch) -> dict[str, torch.Tensor]:
    terms = module.loss_terms(batch)
    required = {"nll/rna", "nll/protein", "kl/rna", "kl/protein", "align", "cls/rna"}
    assert required <= set(terms), sorted(terms)
    assert any(t == "graph" or t.startswith("graph/") for t in terms), sorted(terms)
    for name, value in terms.items():
        assert value.dim() == 0, name
        assert torch.isfinite(value), (name, value)
        assert name.split("/")[0] in WEIGHT_OF_TERM, f"term {name!r} has no loss weight"
    weigh(terms, DEFAULT_WEIGHTS).backward()
    assert_grads(module, "DiagVAE")
    return terms


def test_diagvae_terms_and_gradients(synthetic_spec):
    torch.manual_seed(0)
    spec, batch = synthetic_spec
    assert spec.n_labels == 4
    assert (batch["rna"]["label"] >= 0).all() and (batch["protein"]["label"] == -1).all()
    module = build_module(spec)
    assert module.classifier is not None
    terms = check_terms_and_gradients(module, batch)
    assert float(terms["cls/rna"].detach()) > 0


@pytest.mark.parametrize("protein", list(LIKELIHOODS))
def test_diagvae_every_likelihood(synthetic_spec, protein):
    torch.manual_seed(0)
    spec, batch = synthetic_spec
    check_terms_and_gradients(build_module(spec, protein=protein), batch)


@pytest.mark.parametrize("prior", list(PRIORS))
@pytest.mark.parametrize("classifier", list(CLASSIFIERS))
def test_diagvae_every_prior_and_classifier(synthetic_spec, prior, classifier):
    torch.manual_seed(0)
    spec, batch = synthetic_spec
    check_terms_and_gradients(build_module(spec, prior=prior, classifier=classifier), batch)


def test_diagvae_each_term_reaches_its_modules(synthetic_spec):
    """Each loss term trains the parts of the model it is about."""
    torch.manual_seed(0)
    spec, batch = synthetic_spec
    module = build_module(spec)
    terms = module.loss_terms(batch)

    def reached(term: torch.Tensor, part: nn.Module) -> bool:
        params = list(part.parameters())
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        return any(g is not None and g.abs().sum() > 0 for g in grads)

    graph_terms = [t for n, t in terms.items() if n == "graph" or n.startswith("graph/")]
    for m in ("rna", "protein"):
        nll = terms[f"nll/{m}"]
        for part in (module.x2z[m], module.z2x[m], module.likelihood[m], module.g2v):
            assert reached(nll, part), (m, part)
        other = "protein" if m == "rna" else "rna"
        assert not reached(nll, module.x2z[other])
        assert reached(terms[f"kl/{m}"], module.x2z[m])
        assert reached(terms["align"], module.x2z[m])
    assert reached(terms["cls/rna"], module.classifier)
    assert reached(terms["cls/rna"], module.x2z["rna"])  # labels shape the rna latent
    assert reached(sum(graph_terms), module.g2v)
    assert not reached(sum(graph_terms), module.x2z["rna"])


def test_diagvae_without_labels_has_no_classifier(synthetic_spec):
    spec, batch = synthetic_spec
    unlabelled = DataSpec(spec.modalities, (), spec.graph)
    module = build_module(unlabelled, prior=next(iter(PRIORS)))
    assert module.classifier is None
    batch = {m: {**b, "label": torch.full_like(b["label"], -1)} for m, b in batch.items()}
    terms = module.loss_terms(batch)
    assert not any(t.startswith("cls") for t in terms)
    assert all(torch.isfinite(v) for v in terms.values())


@pytest.mark.parametrize("p", [1, 2])
def test_mean_cost_equals_the_mean_of_the_cost_matrix(p):
    from diagvi.components.alignment import mean_cost
    from diagvi.components.sinkhorn import ground_cost

    x, y = clouds()
    torch.testing.assert_close(mean_cost(x, y + 0.3, p), ground_cost(x, y + 0.3, p).mean())


def test_diagvae_terms_stay_float32_under_bfloat16_autocast(synthetic_spec):
    """trainer=gpu trains in bf16-mixed: the layers may run in bfloat16, the losses must not."""
    spec, batch = synthetic_spec
    module = build_module(spec).eval()  # eval: no dropout, so both passes see the same net
    torch.manual_seed(0)
    full = module.loss_terms(batch)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = module.loss_terms(batch)
    assert set(mixed) == set(full)
    for name, value in mixed.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
        # bfloat16 keeps ~3 significant digits in the layers; the terms stay close
        assert float(value) == pytest.approx(float(full[name]), rel=0.1, abs=0.05), name


def test_graph_loss_shared_partners_estimate_the_mean_over_all_nodes():
    # with many shared partners the negative term is n_negative times each edge's mean BCE
    # against a uniformly drawn node: the exact value is the mean over all nodes
    torch.manual_seed(0)
    v = torch.randn(7, 3)
    edge_index = torch.tensor([[0, 1, 2, 2], [3, 4, 5, 6]])
    w, s = torch.tensor([1.0, 0.5, 1.0, 0.25]), torch.ones(4)
    positive = graph_loss(v, edge_index, w, s, n_negative=0)
    sampled = graph_loss(v, edge_index, w, s, 3, torch.Generator().manual_seed(0), 200_000)
    exact_negative = F.softplus(v[edge_index[0]] @ v.T).mean(1)
    exact = positive + 3 * (w * exact_negative).sum() / w.sum()
    torch.testing.assert_close(sampled, exact, rtol=5e-3, atol=0)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_drops_a_share_p_and_rescales_the_rest(p):
    from diagvi.nn import Dropout

    layer = Dropout(p)
    x = torch.ones(400, 300, requires_grad=True)
    torch.manual_seed(0)
    y = layer(x)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - p) < 0.01
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, y.detach())  # the gradient passes through the same mask
    torch.manual_seed(0)
    torch.testing.assert_close(layer(x), y)  # seeded like torch's own
    assert not torch.equal(layer(x), y)  # a fresh mask per call
    assert torch.equal(layer.eval()(x), x)


def test_dropout_keeps_a_half_precision_input_and_its_drop_share():
    from diagvi.nn import Dropout

    y = Dropout(0.1)(torch.ones(400, 300, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert abs(float((y == 0).float().mean()) - 0.1) < 0.01
