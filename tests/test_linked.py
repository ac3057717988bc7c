"""The guidance graph's linked view (``diagvi.linked``): the joint PCA of the linked features,
fitted once and applied to either modality as one affine map."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from diagvi.graph import build_guidance_graph
from diagvi.linked import LinkedView


def graph():
    features = {
        "rna": pd.Index([f"g{i}" for i in range(6)]),
        "protein": pd.Index([f"p{i}" for i in range(4)]),
    }
    mapping = pd.DataFrame(
        {
            "rna": ["g1", "g3", "g2", "g5", "g0"],
            "protein": ["p0", "p1", "p1", "p2", "p3"],
            "weight": [1.0, 0.5, 0.25, 1.0, 1.0],
            "sign": [1, -1, 1, 1, 1],
        }
    )
    return build_guidance_graph(features, mapping=mapping)


def inputs(seed: int = 0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {0: torch.rand(40, 6, generator=g) * 3, 1: torch.rand(25, 4, generator=g) + 1}


def fitted(n_components: int, data: dict[int, torch.Tensor] | None = None) -> LinkedView:
    view = LinkedView(graph(), n_components=n_components)
    data = inputs() if data is None else data
    return view.fit({side: view.columns(side, x) for side, x in data.items()})


def explicit(view: LinkedView, side: int, x: torch.Tensor, fit_x: torch.Tensor) -> torch.Tensor:
    """Gather the columns, standardise with the fitting data's statistics, project."""
    columns, fit_columns = view.columns(side, x), view.columns(side, fit_x)
    standard = (columns - fit_columns.mean(0)) / fit_columns.std(0) * view.scale[side]
    return standard @ view.loadings


def test_fitted_map_equals_gather_standardise_project():
    data = inputs()
    view = fitted(3, data)
    assert bool(view.fitted)
    assert view.n_edges == 5 and view.n_components == 3
    for side in (0, 1):
        new = inputs(seed=1)[side]
        torch.testing.assert_close(view(side, new), explicit(view, side, new, data[side]))
        # fitted on these cells: each coordinate is centred within its modality
        torch.testing.assert_close(
            view(side, data[side]).mean(0), torch.zeros(3), atol=1e-5, rtol=0
        )


def test_components_are_the_balanced_joint_pca():
    view = fitted(3)
    loadings = view.loadings
    torch.testing.assert_close(loadings.T @ loadings, torch.eye(3), atol=1e-5, rtol=0)
    # the variance of each component, averaged over the two modalities, is its eigenvalue,
    # in decreasing order
    data = inputs()
    per_side = [view(s, data[s]).var(0, unbiased=False) for s in (0, 1)]
    fit_var = [view(s, data[s]).square().mean(0) for s in (0, 1)]
    torch.testing.assert_close((fit_var[0] + fit_var[1]) / 2, view.variance, rtol=1e-3, atol=1e-5)
    assert torch.all(view.variance[:-1] >= view.variance[1:])
    assert all(torch.isfinite(v).all() for v in per_side)


def test_same_cells_in_both_modalities_get_the_same_coordinates():
    # protein p0..p3 measured as the linked genes: the rows of both sides are then equal
    # once standardised (edge signs and weights applied on both ends)
    features = {"a": pd.Index(["x", "y", "z"]), "b": pd.Index(["X", "Y", "Z"])}
    mapping = pd.DataFrame({"a": ["x", "y", "z"], "b": ["X", "Y", "Z"]})
    view = LinkedView(build_guidance_graph(features, mapping=mapping), n_components=2)
    g = torch.Generator().manual_seed(0)
    cells = torch.rand(30, 3, generator=g)
    order = [list(mapping["a"]).index(n) for n in features["a"]]
    view.fit({0: view.columns(0, cells[:, order]), 1: view.columns(1, cells)})
    torch.testing.assert_close(view(0, cells[:, order]), view(1, cells), atol=1e-5, rtol=0)


def test_fit_is_deterministic_and_saved_with_the_state():
    one, two = fitted(3), fitted(3)
    for key, value in one.state_dict().items():
        torch.testing.assert_close(value, two.state_dict()[key])
    loaded = LinkedView(graph(), n_components=3)
    loaded.load_state_dict(one.state_dict())
    x = inputs(seed=2)[1]
    torch.testing.assert_close(loaded(1, x), one(1, x))


def test_unfitted_view_standardises_each_minibatch():
    view = LinkedView(graph(), n_components=5)
    x = inputs()[0]
    out = view(0, x)
    assert out.shape == (40, 5)
    np.testing.assert_allclose(out.mean(0).numpy(), 0.0, atol=1e-5)
    assert view(0, x[:1]).abs().sum() == 0  # one cell: nothing to standardise with


@pytest.mark.parametrize("n_components", [2, 50])
def test_components_never_exceed_the_edges(n_components):
    view = fitted(n_components)
    assert view.n_components == min(n_components, 5)
    assert view(0, inputs()[0]).shape == (40, view.n_components)


def test_model_fits_its_view_in_chunks_on_a_sample():
    from diagvi import DIAGVI
    from diagvi.synthetic import make_synthetic_pair

    adatas, mapping = make_synthetic_pair(n_cells=1500, n_genes=30, n_proteins=8, seed=0)
    for adata in adatas.values():
        DIAGVI.setup_anndata(adata, likelihood="nb")
    model = DIAGVI(adatas, mapping_df=mapping, n_latent=4)
    module = model.module
    assert bool(module.linked.fitted)
    # the same fit from all cells at once (1,500 <= 10,000: every cell is used)
    direct = LinkedView(model.spec.graph)
    columns = {}
    for side, name in enumerate(module.node_ranges):
        x = model.data[name].rows(np.arange(model.data[name].n_obs))["x"].float()
        columns[side] = direct.columns(side, module.transform(name, x))
    direct.fit(columns)
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(module.linked.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    # a sample of fewer cells gives a view close to the full one
    module.fit_on_data(model.data, max_cells=600, seed=1)
    agreement = (module.linked.loadings[:, :2] * direct.loadings[:, :2]).sum(0).abs()
    assert bool((agreement > 0.9).all())
