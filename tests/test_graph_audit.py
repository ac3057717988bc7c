"""Audit of diagvi.graph and diagvi.linked: edges on the right nodes, weights kept, clear errors."""

import numpy as np
import pandas as pd
import pytest
import torch

from diagvi.errors import DataError
from diagvi.graph import build_guidance_graph, graph_from_edges, graph_from_mapping, validate_graph
from diagvi.linked import LinkedView

FEATURES = {
    "rna": ["CD3E", "CD4", "CD8A", "MS4A1"],
    "protein": ["CD3", "CD4", "CD8", "CD20", "CD19"],
}


def links(g):
    """{(name in modality 1, name in modality 2): (weight, sign)} of the cross-modal edges."""
    a, b = g.modalities
    names = [*map(str, FEATURES[a]), *map(str, FEATURES[b])] if a in FEATURES else None
    n1 = g.node_ranges[a][1]
    row, col = g.edge_index.tolist()
    out = {}
    for r, c, w, s in zip(row, col, g.edge_weight.tolist(), g.edge_sign.tolist(), strict=True):
        if r < n1 <= c:
            out[(names[r], names[c]) if names else (r, c - n1)] = (w, s)
    return out


@pytest.mark.parametrize("weight", [1e-50, 1e-300])
def test_weight_that_rounds_to_zero_in_float32_is_refused(weight):
    # stored as float32, such a weight became 0: an edge of weight 0 and a NaN sign in the
    # linked view (sign = (sign * sqrt(w)) / sqrt(w))
    with pytest.raises(DataError, match=r"weights must lie in \(0, 1\]"):
        graph_from_edges(FEATURES, [0, 1], [0, 1], weight=[0.5, weight])
    table = pd.DataFrame({"rna": ["CD4"], "protein": ["CD4"], "weight": [weight]})
    with pytest.raises(DataError, match=r"weights must lie in \(0, 1\]"):
        graph_from_mapping(FEATURES, table)
    g = graph_from_edges(FEATURES, [1], [1])
    w = g.edge_weight.double()
    w[g.edge_index[0] != g.edge_index[1]] = weight
    with pytest.raises(DataError, match=r"weights must lie in \(0, 1\]"):
        validate_graph(g.clone().update({"edge_weight": w}), FEATURES)


def test_small_float32_weight_is_kept():
    g = graph_from_edges(FEATURES, [1], [1], weight=1e-30)
    assert links(g) == {("CD4", "CD4"): (pytest.approx(1e-30), 1.0)}
    view = LinkedView(g, n_components=1)
    assert torch.isfinite(view.sign).all() and view.sign.tolist() == [1.0]


def test_mapping_error_names_the_table_rows_not_kept_positions():
    # the first row is skipped (no rna name): the bad weight is in row 12, the 2nd kept row
    table = pd.DataFrame(
        {
            "rna": [None, "CD4", "CD8A"],
            "protein": ["CD3", "CD4", "CD8"],
            "weight": [0.5, 0.5, 2.0],
            "sign": [1, 1, 1],
        },
        index=[10, 11, 12],
    )
    with pytest.raises(DataError, match=r"weights must lie in \(0, 1\]; 1 do not, in rows 12 "):
        graph_from_mapping(FEATURES, table)
    with pytest.raises(DataError, match=r"signs must be -1 or \+1; 1 are not, in rows 11 "):
        graph_from_mapping(FEATURES, table.assign(weight=0.5, sign=[1, 0, 1]))


def test_integer_names_in_a_column_with_missing_names():
    # pandas stores integers as floats in a column with a missing value: 1 -> 1.0
    features = {"a": [1, 2, 3], "b": np.array([10, 20])}
    table = pd.DataFrame({"a": [1, 3, None], "b": [20, 10, 10]})
    assert table["a"].dtype == np.float64
    g = graph_from_mapping(features, table)
    assert links(g) == {(0, 1): (1.0, 1.0), (2, 0): (1.0, 1.0)}
    # names that really are floats still match as they are
    g = graph_from_mapping(
        {"a": ["1.5", "2.0"], "b": ["10"]}, pd.DataFrame({"a": [2.0, 1.5], "b": [10, 10]})
    )
    assert set(links(g)) == {(0, 0), (1, 0)}
    # and a true miss is still refused
    with pytest.raises(DataError, match=r"column 'a' are not features of modality 'a': '7'"):
        graph_from_mapping(features, pd.DataFrame({"a": [7.0, None], "b": [10, 10]}))


def test_mapping_order_and_duplicates_do_not_change_the_graph():
    table = pd.DataFrame(
        {
            "protein": ["CD20", "CD19", "CD3", "CD20", "CD8"],
            "rna": ["MS4A1", "MS4A1", "CD3E", "MS4A1", "CD8A"],
            "weight": [0.4, 0.3, 1.0, 0.9, 0.2],
            "sign": [-1, 1, 1, -1, -1],
        }
    )
    before = table.copy()
    g = graph_from_mapping(FEATURES, table)
    pd.testing.assert_frame_equal(table, before)
    assert links(g) == {
        ("MS4A1", "CD20"): (pytest.approx(0.9), -1.0),
        ("MS4A1", "CD19"): (pytest.approx(0.3), 1.0),
        ("CD3E", "CD3"): (1.0, 1.0),
        ("CD8A", "CD8"): (pytest.approx(0.2), -1.0),
    }
    shuffled = graph_from_mapping(FEATURES, table.iloc[::-1])
    for key in ("edge_index", "edge_weight", "edge_sign"):
        assert torch.equal(g[key], shuffled[key])
    # the linked view holds exactly these edges, weights and signs, once each
    view = LinkedView(g)
    got = {
        (FEATURES["rna"][a], FEATURES["protein"][b]): (pytest.approx(w), s)
        for a, b, w, s in zip(
            view.index_a.tolist(),
            view.index_b.tolist(),
            view.weight.tolist(),
            view.sign.tolist(),
            strict=True,
        )
    }
    assert got == links(g)


def test_validate_graph_renumbered_keeps_the_linked_columns():
    g = graph_from_mapping(
        FEATURES,
        pd.DataFrame({"rna": ["CD8A", "MS4A1"], "protein": ["CD8", "CD19"], "sign": [1, -1]}),
    )
    swapped = {"protein": FEATURES["protein"], "rna": FEATURES["rna"]}
    view = LinkedView(build_guidance_graph(swapped, graph=g))
    pairs = {
        (swapped["protein"][a], swapped["rna"][b], s)
        for a, b, s in zip(
            view.index_a.tolist(), view.index_b.tolist(), view.sign.tolist(), strict=True
        )
    }
    assert pairs == {("CD8", "CD8A", 1.0), ("CD19", "MS4A1", -1.0)}


def test_linked_view_column_constant_in_the_fitting_cells_stays_bounded():
    # a gene not detected in the cells the view is fitted on (e.g. the sample fit_on_data
    # draws) must not turn into a ~1e6 coordinate for a cell that expresses it
    features = {"rna": [f"g{i}" for i in range(4)], "protein": [f"p{i}" for i in range(4)]}
    mapping = pd.DataFrame({"rna": features["rna"], "protein": features["protein"]})
    view = LinkedView(build_guidance_graph(features, mapping=mapping), n_components=2)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(50, 4, generator=gen), torch.rand(50, 4, generator=gen)
    a[:, 0] = 0.0
    view.fit({0: view.columns(0, a), 1: view.columns(1, b)})
    new = a[:3].clone()
    new[:, 0] = 1.0
    assert view(0, new).abs().max() < 10
    # the constant column carries nothing: the cells keep their coordinates
    torch.testing.assert_close(view(0, new), view(0, a[:3]))
    torch.testing.assert_close(view(0, a).mean(0), torch.zeros(2), atol=1e-5, rtol=0)
