"""The guidance graph's statement about cells: linked features co-vary (``link/<m>`` terms),
and linked features steering the transport plan (``feature_weight``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import diagvi  # noqa: F401  (fills the registries)
from diagvi.components.alignment import UnbalancedSinkhorn
from diagvi.graph import build_guidance_graph
from diagvi.linked import linked_pairs
from diagvi.module import edge_correlations


def small_graph():
    features = {"rna": pd.Index(["g0", "g1", "g2", "g3"]), "protein": pd.Index(["p0", "p1"])}
    mapping = pd.DataFrame(
        {
            "rna": ["g1", "g3", "g2"],
            "protein": ["p0", "p1", "p1"],
            "weight": [1.0, 0.5, 0.25],
            "sign": [1, -1, 1],
        }
    )
    return build_guidance_graph(features, mapping=mapping)


def test_linked_pairs_are_the_mapping_rows():
    index_a, index_b, scale = linked_pairs(small_graph())
    weights = [round(w, 5) for w in scale[0].square().tolist()]
    rows = sorted(zip(index_a.tolist(), index_b.tolist(), weights, strict=True))
    assert rows == [(1, 0, 1.0), (2, 1, 0.25), (3, 1, 0.5)]
    signs = {
        (a, b): s
        for a, b, s in zip(
            index_a.tolist(), index_b.tolist(), torch.sign(scale[1]).tolist(), strict=True
        )
    }
    assert signs == {(1, 0): 1.0, (2, 1): 1.0, (3, 1): -1.0}


def test_edge_correlations_equal_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 3, generator=g)
    v_edges = torch.randn(4, 3, generator=g)
    x = torch.rand(64, 6, generator=g)
    x[:, 5] = 0.7  # a constant feature: correlation 0, not NaN
    index = torch.tensor([0, 2, 2, 5])
    corr = edge_correlations(z, v_edges, x, index)
    predicted, measured = (z @ v_edges.T).numpy(), x[:, index].numpy()
    expected = [np.corrcoef(predicted[:, e], measured[:, e])[0, 1] for e in range(3)]
    np.testing.assert_allclose(corr[:3].numpy(), expected, atol=1e-5)
    assert float(corr[3]) == pytest.approx(0.0, abs=1e-4)
    # a feature that is an affine function of the prediction correlates +1 or -1
    x2 = torch.cat([3 * (z @ v_edges[:1].T) + 1, -(z @ v_edges[1:2].T)], 1)
    both = edge_correlations(z, v_edges[:2], x2, torch.tensor([0, 1]))
    np.testing.assert_allclose(both.numpy(), [1.0, -1.0], atol=1e-5)
    zg, vg = z.clone().requires_grad_(), v_edges.clone().requires_grad_()
    edge_correlations(zg, vg, x, index).sum().backward()
    assert torch.isfinite(zg.grad).all() and torch.isfinite(vg.grad).all()


def test_link_consistency_prefers_the_orientation_the_graph_implies(synthetic_module):
    module, batch = synthetic_module
    inputs = {m: module.transform(m, batch[m]["x"]) for m in module.names}
    v = module.g2v().loc.detach()
    z = {m: torch.randn(len(batch[m]["x"]), v.shape[1]) for m in module.names}
    terms = module.link_consistency(z, inputs, v)
    assert set(terms) == {f"link/{m}" for m in module.names}
    for value in terms.values():
        assert 0.0 <= float(value) <= 2.0
    # gradient reaches the latent points
    zg = {m: t.clone().requires_grad_() for m, t in z.items()}
    sum(module.link_consistency(zg, inputs, v).values()).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in zg.values())


def test_self_consistency_is_zero_when_every_feature_follows_its_decoder(synthetic_module):
    module, batch = synthetic_module
    v = module.g2v().loc.detach()
    g = torch.Generator().manual_seed(1)
    z = {m: torch.randn(len(batch[m]["x"]), v.shape[1], generator=g) for m in module.names}
    # each feature an affine function of its own decoder's prediction, different per feature
    own = {m: module.feature_embedding(m, v) for m in module.names}
    follows = {m: 3.0 * z[m] @ own[m].T + torch.linspace(-1, 1, len(own[m])) for m in own}
    terms = module.self_consistency(z, follows, v)
    assert set(terms) == {f"self/{m}" for m in module.names}
    for value in terms.values():
        assert float(value) == pytest.approx(0.0, abs=1e-4)
    noise = {m: torch.rand(x.shape, generator=g) for m, x in follows.items()}
    vg = v.clone().requires_grad_()
    unrelated = module.self_consistency(z, noise, vg)
    for value in unrelated.values():
        assert 0.5 < float(value) < 1.5  # correlations near 0
    sum(unrelated.values()).backward()
    # every feature's embedding gets a gradient, linked to the other modality or not
    assert (vg.grad.abs().sum(1) > 0).all()


def test_feature_weight_changes_the_plan_not_the_gradient_path():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, requires_grad=True)
    y = torch.randn(50, 3, generator=g)
    fx, fy = torch.randn(40, 5, generator=g), torch.randn(50, 5, generator=g)
    plain = UnbalancedSinkhorn()({"a": x, "b": y})
    steered = UnbalancedSinkhorn(feature_weight=0.5)({"a": x, "b": y}, {"a": fx, "b": fy})
    assert torch.isfinite(plain) and torch.isfinite(steered)
    assert float(steered) != pytest.approx(float(plain))
    steered.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="feature_weight"):
        UnbalancedSinkhorn(feature_weight=1.0)


@pytest.fixture(scope="module")
def synthetic_module():
    from diagvi.data import DataSpec, ModalitySetup, read_modalities
    from diagvi.module import DiagVAE
    from diagvi.registry import ALIGNMENTS, GRAPH_ENCODERS, LIKELIHOODS, PRIORS
    from diagvi.synthetic import make_synthetic_pair

    torch.manual_seed(0)
    adatas, mapping = make_synthetic_pair(n_cells=48, n_genes=30, n_proteins=8, seed=0)
    setups = {m: ModalitySetup(likelihood="nb") for m in adatas}
    data, categories = read_modalities(adatas, setups)
    graph = build_guidance_graph({m: d.var_names for m, d in data.items()}, mapping=mapping)
    spec = DataSpec.from_data(data, categories, graph)
    module = DiagVAE(
        spec,
        n_latent=4,
        likelihoods={m: LIKELIHOODS.get("nb") for m in adatas},
        prior=PRIORS.get("normal"),
        graph_encoder=GRAPH_ENCODERS.get("gcn"),
        alignment=ALIGNMENTS.build("uot"),
        encoder={"n_hidden": 16, "n_layers": 1, "dropout": 0.0},
    )
    return module, {m: d.rows(np.arange(32)) for m, d in data.items()}
