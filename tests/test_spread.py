"""The latent-spread term (``spread/<m>``): its value, its pull, and what it prevents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diagvi import DIAGVI
from diagvi.module import SPREAD_MIN_CELLS, spread_kl
from diagvi.synthetic import make_synthetic_pair


def test_spread_kl_is_the_kl_of_each_dimension_spread_below_the_prior():
    torch.manual_seed(0)
    loc = torch.randn(50, 3) * torch.tensor([0.1, 0.5, 3.0])
    variance = loc.var(0)
    assert variance[2] > 1  # wider than the prior: costs nothing
    expected = 0.5 * (variance[:2] - 1 - variance[:2].log()).sum()
    assert float(spread_kl(loc)) == pytest.approx(float(expected), rel=1e-6)
    assert float(spread_kl(loc[:, 2:])) == 0.0
    # zero exactly when every dimension has the prior's unit spread, whatever the centre
    unit = (loc - loc.mean(0)) / loc.std(0) + 5.0
    assert float(spread_kl(unit)) == pytest.approx(0.0, abs=1e-5)


def test_spread_kl_pushes_a_shrinking_latent_outwards_only():
    torch.manual_seed(0)
    loc = torch.randn(64, 4)
    for scale, outwards in ((0.05, True), (0.5, True), (3.0, False)):
        s = torch.tensor(scale, requires_grad=True)
        spread_kl(loc * s).backward()
        assert (float(s.grad) < 0) == outwards  # the loss falls as the spread grows towards 1
    assert float(s.grad) == 0.0  # a floor: no pull inwards from above the prior's spread
    # the smaller a dimension's spread, the harder the push
    s = torch.ones(2, requires_grad=True)
    spread_kl(loc[:, :2] * torch.tensor([0.01, 0.1]) * s).backward()
    assert s.grad[0] < s.grad[1] < 0


def test_spread_kl_finite_for_identical_cells():
    # no spread at all: large, but a number (and no gradient: only a collapse that is
    # complete escapes the push, which the training never reaches)
    value = spread_kl(torch.ones(8, 3))
    assert torch.isfinite(value) and float(value) > 10


def test_small_minibatches_have_no_spread_term():
    # a variance of a few cells is too noisy for a logarithm: the term is left out below
    # SPREAD_MIN_CELLS (the epoch's last minibatch may hold two cells)
    adatas, mapping = make_synthetic_pair(n_cells=40, n_genes=12, n_proteins=4)
    for adata in adatas.values():
        DIAGVI.setup_anndata(adata)
    model = DIAGVI(adatas, mapping_df=mapping, n_latent=4)
    module = model.module.train()
    for n, present in ((2, False), (SPREAD_MIN_CELLS - 1, False), (SPREAD_MIN_CELLS, True)):
        terms = module.loss_terms({m: d.rows(np.arange(n)) for m, d in model.data.items()})
        assert ("spread/rna" in terms) == present and ("spread/protein" in terms) == present
        assert all(torch.isfinite(t) for t in terms.values())


def _adam_drift(lam_spread: float, steps: int = 800) -> float:
    """The mechanism in miniature: a latent ``x @ w`` pulled inwards by a weak term (as the
    raw-cost alignment and the per-cell KL pull), trained by Adam; returns its final spread."""
    torch.manual_seed(0)
    x = torch.randn(128, 8)
    w = torch.nn.Parameter(torch.eye(8) * 0.5)
    opt = torch.optim.Adam([w], lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        loc = x @ w
        loss = 1e-3 * loc.square().sum(1).mean() + lam_spread * spread_kl(loc)
        loss.backward()
        opt.step()
    return float((x @ w).detach().std(0).mean())


def test_adam_drifts_a_weakly_pulled_latent_unless_its_spread_is_held():
    # Adam's steps are about lr whatever the gradient's size: a persistent weak pull shrinks
    # the latent steadily; the spread term's push stops it near the prior's unit spread
    free, held = _adam_drift(0.0), _adam_drift(0.1)
    assert free < 0.1  # from 0.5: still shrinking
    assert held > 0.9


def _latent_spread(lam_spread: float) -> float:
    adatas, mapping = make_synthetic_pair(n_cells=300, n_genes=30, n_proteins=8, seed=3)
    for adata in adatas.values():
        DIAGVI.setup_anndata(adata)
    model = DIAGVI(adatas, mapping_df=mapping, n_latent=6, seed=0)
    model.train(
        max_epochs=150,
        batch_size=64,
        accelerator="cpu",
        early_stopping=False,
        lam_spread=lam_spread,
        seed=0,
    )
    latents = model.get_latent_representation()
    return float(np.mean([lat.std(0).mean() for lat in latents.values()]))


def test_without_the_term_the_latent_shrinks_further():
    # the fifteenth round of experiments/alignment_defaults on a small pair: without the term
    # nothing holds the latent's scale, and training shrinks it further
    held, free = _latent_spread(0.1), _latent_spread(0.0)
    assert held > 1.1 * free, (held, free)
