"""Tests for diagvi.graph: guidance-graph builders and validation."""

import time

import numpy as np
import pandas as pd
import pytest
import torch
from torch_geometric.data import Data

from diagvi.errors import DataError
from diagvi.graph import (
    build_guidance_graph,
    cross_modal_edges,
    graph_from_edges,
    graph_from_mapping,
    graph_from_shared_names,
    validate_graph,
)

FEATURES = {
    "rna": ["CD3E", "CD4", "CD8A", "MS4A1"],
    "protein": ["CD3", "CD4", "CD8", "CD20", "CD19"],
}
N1, N2 = 4, 5
N = N1 + N2


def edge_dict(g):
    """{(src, dst): (weight, sign)} of a graph."""
    row, col = g.edge_index.tolist()
    return {
        (r, c): (w, s)
        for r, c, w, s in zip(row, col, g.edge_weight.tolist(), g.edge_sign.tolist(), strict=True)
    }


def check_invariants(g, n1=N1, n2=N2):
    """Properties every builder output must have."""
    n = n1 + n2
    assert isinstance(g, Data)
    assert g.num_nodes == n
    assert g.edge_index.dtype == torch.int64 and g.edge_index.shape[0] == 2
    assert g.edge_weight.dtype == torch.float32 and g.edge_sign.dtype == torch.float32
    assert isinstance(g.modalities, tuple) and len(g.modalities) == 2
    assert list(g.node_ranges.values()) == [(0, n1), (n1, n)]
    assert ((g.edge_weight > 0) & (g.edge_weight <= 1)).all()
    assert set(g.edge_sign.tolist()) <= {-1.0, 1.0}
    edges = edge_dict(g)
    assert len(edges) == g.edge_index.shape[1], "duplicate edges"
    for i in range(n):
        assert edges[(i, i)] == (1.0, 1.0)
    for (r, c), ws in edges.items():
        assert edges[(c, r)] == ws
    keys = (g.edge_index[0] * n + g.edge_index[1]).tolist()
    assert keys == sorted(keys)
    a, b = g.modalities
    validate_graph(g, {a: list(map(str, range(n1))), b: list(map(str, range(n2)))})


def cross(g):
    """{(src, dst)} cross-modal edges with src in modality 1 (local indices)."""
    return {(r, c - N1): ws for (r, c), ws in edge_dict(g).items() if r < N1 <= c}


# -- graph_from_edges -------------------------------------------------------------------------


def test_edges_defaults():
    g = graph_from_edges(FEATURES, [0, 1, 2], [0, 1, 2])
    check_invariants(g)
    assert g.modalities == ("rna", "protein")
    assert g.node_ranges == {"rna": (0, 4), "protein": (4, 9)}
    assert g.edge_index.shape[1] == N + 2 * 3
    assert cross(g) == {(0, 0): (1.0, 1.0), (1, 1): (1.0, 1.0), (2, 2): (1.0, 1.0)}
    assert cross_modal_edges(g) == 3


def test_edges_weight_sign_and_duplicates_keep_max():
    g = graph_from_edges(
        FEATURES, np.array([3, 3, 0, 0]), torch.tensor([3, 4, 0, 0]), [0.5, 0.25, 0.2, 0.7], -1
    )
    check_invariants(g)
    assert cross(g) == {
        (3, 3): (0.5, -1.0),
        (3, 4): (0.25, -1.0),
        (0, 0): (pytest.approx(0.7), -1.0),
    }
    assert cross_modal_edges(g) == 3


def test_edges_conflicting_signs():
    with pytest.raises(DataError, match=r"1 rna-protein feature pairs .*CD4-CD4"):
        graph_from_edges(FEATURES, [1, 1], [1, 1], sign=[1, -1])


@pytest.mark.parametrize(
    ("src", "dst", "kwargs", "pattern"),
    [
        ([0, 4], [0, 0], {}, r"src indexes modality 'rna' with 4 features.*\[0, 4\).*4"),
        ([0], [-1], {}, r"dst indexes modality 'protein'.*-1"),
        ([0, 1], [0], {}, r"same length, got 2 and 1"),
        ([], [], {}, r"at least one rna-protein edge"),
        ([0], [0], {"weight": 0.0}, r"weights must lie in \(0, 1\].*0\.0"),
        ([0], [0], {"weight": 1.5}, r"weights must lie in \(0, 1\]"),
        ([0], [0], {"weight": float("nan")}, r"weights must lie in \(0, 1\]"),
        ([0, 1], [0, 1], {"weight": [1.0]}, r"weight must be a scalar or have one value per edge"),
        ([0], [0], {"sign": 0}, r"signs must be -1 or \+1"),
        ([[0]], [[0]], {}, r"src must be 1-D"),
    ],
)
def test_edges_errors(src, dst, kwargs, pattern):
    with pytest.raises(DataError, match=pattern):
        graph_from_edges(FEATURES, src, dst, **kwargs)


def test_edges_type_errors():
    with pytest.raises(TypeError, match="integer feature indices"):
        graph_from_edges(FEATURES, [0.5], [0])
    with pytest.raises(TypeError, match="weight must be numeric"):
        graph_from_edges(FEATURES, [0], [0], weight=["heavy"])


def test_features_checked():
    with pytest.raises(TypeError, match="features must be a mapping"):
        graph_from_shared_names([["a"], ["b"]])
    with pytest.raises(DataError, match="exactly 2 modalities, got 3"):
        graph_from_shared_names({"a": ["x"], "b": ["x"], "c": ["x"]})
    with pytest.raises(TypeError, match=r"features\['b'\] must be a sequence"):
        graph_from_shared_names({"a": ["x"], "b": "x"})
    with pytest.raises(DataError, match="modality 'b' has no features"):
        graph_from_shared_names({"a": ["x"], "b": []})
    with pytest.raises(DataError, match="modality 'a' has duplicate feature names: 'x'"):
        graph_from_shared_names({"a": ["x", "y", "x"], "b": ["x"]})


# -- graph_from_shared_names ------------------------------------------------------------------


def test_shared_names():
    g = graph_from_shared_names(FEATURES)
    check_invariants(g)
    assert cross(g) == {(1, 1): (1.0, 1.0)}
    f = {"atac": pd.Index(["g1", "g2", "g3"]), "rna": np.array(["g3", "g0", "g1"])}
    g = graph_from_shared_names(f)
    assert g.modalities == ("atac", "rna")
    assert {(r, c - 3) for r, c in g.edge_index.T.tolist() if r < 3 <= c} == {(0, 2), (2, 0)}


def test_shared_names_none():
    with pytest.raises(DataError, match=r"'a' and 'b' share no feature name.*'x'.*'y'"):
        graph_from_shared_names({"a": ["x"], "b": ["y"]})


# -- graph_from_mapping -----------------------------------------------------------------------

MAPPING = pd.DataFrame(
    {
        "rna": ["CD3E", "CD4", "CD8A", "MS4A1", "MS4A1", None, "CD3E"],
        "protein": ["CD3", "CD4", "CD8", "CD20", "CD19", "CD19", np.nan],
        "extra": range(7),
    }
)


def test_mapping_dataframe_one_to_many():
    g = graph_from_mapping(FEATURES, MAPPING)
    check_invariants(g)
    assert set(cross(g)) == {(0, 0), (1, 1), (2, 2), (3, 3), (3, 4)}
    assert cross_modal_edges(g) == 5


def test_mapping_many_to_one_weight_sign():
    table = pd.DataFrame(
        {
            "protein": ["CD3", "CD3", "CD8"],
            "rna": ["CD3E", "CD4", "CD8A"],
            "weight": [0.5, 1.0, 0.3],
            "sign": [1, -1, -1],
        }
    )
    g = graph_from_mapping(FEATURES, table)
    check_invariants(g)
    got = cross(g)
    assert got[(0, 0)] == (0.5, 1.0)
    assert got[(1, 0)] == (1.0, -1.0)
    assert got[(2, 2)] == (pytest.approx(0.3), -1.0)
    assert len(got) == 3


def test_mapping_csv(tmp_path):
    path = tmp_path / "map.csv"
    MAPPING.assign(weight=0.5).to_csv(path, index=False)
    for source in (path, str(path)):
        g = graph_from_mapping(FEATURES, source)
        check_invariants(g)
        assert set(cross(g)) == {(0, 0), (1, 1), (2, 2), (3, 3), (3, 4)}
        assert set(cross(g).values()) == {(0.5, 1.0)}


def test_mapping_csv_numeric_names(tmp_path):
    path = tmp_path / "map.csv"
    pd.DataFrame({"a": ["001", "2"], "b": ["10", "x"]}).to_csv(path, index=False)
    g = graph_from_mapping({"a": ["001", "2"], "b": ["x", "10"]}, path)
    assert cross_modal_edges(g) == 2


def test_mapping_unknown_names():
    table = pd.DataFrame({"rna": ["CD4", "CD8B", "CD3G"], "protein": ["CD4", "CD8", "CD3"]})
    with pytest.raises(
        DataError,
        match=r"2 name\(s\) in column 'rna' are not features of modality 'rna': "
        r"'CD8B' \(did you mean 'CD8A'\?\), 'CD3G' \(did you mean 'CD3E'\?\)",
    ):
        graph_from_mapping(FEATURES, table)
    with pytest.warns(UserWarning, match="ignoring those rows"):
        g = graph_from_mapping(FEATURES, table, on_missing="ignore")
    assert cross(g) == {(1, 1): (1.0, 1.0)}


def test_mapping_unknown_names_truncated():
    table = pd.DataFrame({"rna": ["CD4"] * 8, "protein": [f"zz{i}" for i in range(8)]})
    with pytest.raises(
        DataError, match=r"8 name\(s\) in column 'protein'.*'zz4', \.\.\. \(\+3 more\)"
    ):
        graph_from_mapping(FEATURES, table)


def test_mapping_errors(tmp_path):
    with pytest.raises(
        DataError, match=r"lacks column\(s\) 'protein'.*\['rna', 'protein'\].*present"
    ):
        graph_from_mapping(FEATURES, MAPPING.rename(columns={"protein": "adt"}))
    path = tmp_path / "bad.csv"
    pd.DataFrame({"gene": ["CD4"], "adt": ["CD4"]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"bad.csv.*'rna', 'protein'.*present: \['gene', 'adt'\]"):
        graph_from_mapping(FEATURES, path)
    with pytest.raises(DataError, match="no row linking"):
        graph_from_mapping(FEATURES, MAPPING.iloc[5:])
    bad_w = pd.DataFrame({"rna": ["CD4"], "protein": ["CD4"], "weight": [2.0]})
    with pytest.raises(DataError, match=r"mapping table: weights must lie in \(0, 1\]"):
        graph_from_mapping(FEATURES, bad_w)
    bad_w = pd.DataFrame({"rna": ["CD4", "CD8A"], "protein": ["CD4", "CD8"], "weight": [1, "x"]})
    with pytest.raises(DataError, match=r"column 'weight' is missing or not numeric in rows 1"):
        graph_from_mapping(FEATURES, bad_w)
    bad_s = pd.DataFrame({"rna": ["CD4"], "protein": ["CD4"], "sign": [2]})
    with pytest.raises(DataError, match=r"signs must be -1 or \+1"):
        graph_from_mapping(FEATURES, bad_s)
    with pytest.raises(TypeError, match="mapping must be a DataFrame or a CSV path"):
        graph_from_mapping(FEATURES, {"rna": ["CD4"], "protein": ["CD4"]})
    with pytest.raises(ValueError, match="on_missing"):
        graph_from_mapping(FEATURES, MAPPING, on_missing="drop")


# -- validate_graph ---------------------------------------------------------------------------


def test_validate_roundtrip_and_copy():
    g = graph_from_shared_names(FEATURES)
    raw = Data(
        edge_index=g.edge_index.int(),
        edge_weight=g.edge_weight.double(),
        edge_sign=g.edge_sign.long(),
        num_nodes=N,
        x=torch.ones(N, 2),
    )
    before = {k: v.clone() for k, v in raw.items() if isinstance(v, torch.Tensor)}
    out = validate_graph(raw, FEATURES)
    assert out is not raw
    assert out.edge_index.dtype == torch.int64
    assert out.edge_weight.dtype == out.edge_sign.dtype == torch.float32
    assert out.modalities == ("rna", "protein")
    assert out.node_ranges == {"rna": (0, N1), "protein": (N1, N)}
    assert torch.equal(out.x, raw.x)
    assert set(raw.keys()) == {*before, "num_nodes"}
    for k, v in before.items():
        assert raw[k].dtype == v.dtype and torch.equal(raw[k], v)


def test_validate_renumbers_a_graph_built_in_the_other_modality_order():
    mapping = pd.DataFrame({"rna": ["CD3E", "CD4"], "protein": ["CD3", "CD4"]})
    g = graph_from_mapping(FEATURES, mapping)
    swapped = {"protein": FEATURES["protein"], "rna": FEATURES["rna"]}
    out = validate_graph(g, swapped)
    assert out.modalities == ("protein", "rna")
    names = np.array(FEATURES["protein"] + FEATURES["rna"])
    row, col = out.edge_index.numpy()
    links = {(names[r], names[c]) for r, c in zip(row, col, strict=True) if r < N2 <= c}
    assert links == {("CD3", "CD3E"), ("CD4", "CD4")}
    with pytest.raises(DataError, match=r"built for modalities \['rna', 'protein'\]"):
        validate_graph(g, {"rna": FEATURES["rna"], "adt": FEATURES["protein"]})
    with pytest.raises(DataError, match="4 nodes for 'rna', whose data have 5 features"):
        validate_graph(g, {"rna": FEATURES["rna"] + ["X"], "protein": FEATURES["protein"][:4]})


def _graph(**changes):
    g = graph_from_shared_names(FEATURES)
    d = Data(edge_index=g.edge_index, edge_weight=g.edge_weight, edge_sign=g.edge_sign, num_nodes=N)
    for k, v in changes.items():
        d[k] = v
    return d


def _with_edges(extra_row, extra_col, w=1.0, s=1.0):
    g = _graph()
    ei = torch.cat([g.edge_index, torch.tensor([extra_row, extra_col])], dim=1)
    k = len(extra_row)
    return _graph(
        edge_index=ei,
        edge_weight=torch.cat([g.edge_weight, torch.ones(k) * w]),
        edge_sign=torch.cat([g.edge_sign, torch.ones(k) * s]),
    )


def test_validate_errors():
    g = _graph()
    del g.edge_weight, g.edge_sign
    with pytest.raises(DataError, match="lacks edge_weight, edge_sign"):
        validate_graph(g, FEATURES)
    with pytest.raises(DataError, match=r"has 8 nodes but the features number 9 \(4 'rna' \+ 5"):
        validate_graph(_graph(num_nodes=8), FEATURES)
    ei = _graph().edge_index
    with pytest.raises(DataError, match=r"edge_index must be an integer array of shape \(2, E\)"):
        validate_graph(_graph(edge_index=ei.float()), FEATURES)
    with pytest.raises(DataError, match=r"edge_index must be an integer array"):
        validate_graph(_graph(edge_index=ei.T), FEATURES)
    with pytest.raises(DataError, match=r"edge_weight must be a numeric array of shape \(11,\)"):
        validate_graph(_graph(edge_weight=torch.ones(3)), FEATURES)
    with pytest.raises(DataError, match=r"weights must lie in \(0, 1\]"):
        validate_graph(_graph(edge_weight=torch.zeros(11)), FEATURES)
    with pytest.raises(DataError, match=r"signs must be -1 or \+1.*0\.5"):
        validate_graph(_graph(edge_sign=torch.full((11,), 0.5)), FEATURES)
    with pytest.raises(DataError, match=r"must lie in \[0, 9\); 2 edges do not"):
        validate_graph(_with_edges([0, 9], [9, 0]), FEATURES)
    with pytest.raises(DataError, match=r"duplicated edges.*'CD4->CD4'"):
        validate_graph(_with_edges([1, 5], [5, 1]), FEATURES)
    with pytest.raises(DataError, match=r"symmetric.*2 edges are not: 'CD3E->CD3', 'CD8A->CD8'"):
        validate_graph(_with_edges([0, 2], [4, 6]), FEATURES)
    # reverse present but with another weight / sign
    with pytest.raises(DataError, match=r"symmetric.*'CD3E->CD3', 'CD3->CD3E'"):
        validate_graph(_with_edges([0, 4], [4, 0], w=torch.tensor([1.0, 0.5])), FEATURES)
    with pytest.raises(DataError, match=r"symmetric.*'CD3E->CD3', 'CD3->CD3E'"):
        validate_graph(_with_edges([0, 4], [4, 0], s=torch.tensor([1.0, -1.0])), FEATURES)


def test_validate_self_loops_and_cross_edges():
    g = _graph()
    keep = g.edge_index[0] != g.edge_index[1]
    keep[0] = True  # keep the CD3E self-loop only
    d = _graph(edge_index=g.edge_index[:, keep], edge_weight=g.edge_weight[keep])
    d.edge_sign = g.edge_sign[keep]
    with pytest.raises(
        DataError, match=r"self-loop on every node; 8 lack one: 'CD4', .*\(\+3 more\)"
    ):
        validate_graph(d, FEATURES)
    loops = torch.arange(N).repeat(2, 1)
    with pytest.raises(DataError, match="no edge between 'rna' and 'protein'"):
        validate_graph(
            _graph(edge_index=loops, edge_weight=torch.ones(N), edge_sign=torch.ones(N)), FEATURES
        )
    neg = _graph(edge_index=loops, edge_weight=torch.ones(N), edge_sign=-torch.ones(N))
    with pytest.raises(DataError, match="sign \\+1 self-loop on every node; 9 lack one"):
        validate_graph(neg, FEATURES)


def test_validate_type_errors():
    with pytest.raises(TypeError, match="must be a torch_geometric.data.Data, got dict"):
        validate_graph({"edge_index": None}, FEATURES)
    with pytest.raises(TypeError, match="graph.edge_weight must be a torch.Tensor, got list"):
        validate_graph(_graph(edge_weight=[1.0] * 11), FEATURES)


def test_validate_large_graph_fast():
    n1, n2, k = 20_000, 30_000, 475_000
    rng = np.random.default_rng(0)
    # distinct cross-modal pairs
    keys = rng.choice(n1 * n2, size=k, replace=False)
    g = graph_from_edges(
        {"a": [f"a{i}" for i in range(n1)], "b": [f"b{i}" for i in range(n2)]},
        keys // n2,
        keys % n2,
        weight=rng.uniform(0.1, 1.0, size=k),
        sign=rng.choice([-1, 1], size=k),
    )
    assert g.edge_index.shape[1] == 2 * k + n1 + n2 >= 1_000_000
    features = {"a": [f"a{i}" for i in range(n1)], "b": [f"b{i}" for i in range(n2)]}
    perm = torch.from_numpy(rng.permutation(g.edge_index.shape[1]))
    shuffled = Data(
        edge_index=g.edge_index[:, perm],
        edge_weight=g.edge_weight[perm],
        edge_sign=g.edge_sign[perm],
        num_nodes=n1 + n2,
    )
    start = time.perf_counter()
    out = validate_graph(shuffled, features)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"validate_graph took {elapsed:.2f}s on 1e6 edges"
    assert torch.equal(out.edge_index, shuffled.edge_index)
    assert cross_modal_edges(out) == k


# -- build_guidance_graph ---------------------------------------------------------------------


def test_build_dispatch():
    shared = build_guidance_graph(FEATURES)
    assert cross(shared) == {(1, 1): (1.0, 1.0)}
    assert set(cross(build_guidance_graph(FEATURES, mapping=MAPPING))) == {
        (0, 0), (1, 1), (2, 2), (3, 3), (3, 4)
    }  # fmt: skip
    assert set(cross(build_guidance_graph(FEATURES, edges=MAPPING))) == set(
        cross(graph_from_mapping(FEATURES, MAPPING))
    )
    g = build_guidance_graph(FEATURES, edges=([0, 3], [0, 4], [0.5, 0.5], [1, -1]))
    assert cross(g) == {(0, 0): (0.5, 1.0), (3, 4): (0.5, -1.0)}
    assert cross(build_guidance_graph(FEATURES, edges=([2], [2]))) == {(2, 2): (1.0, 1.0)}
    v = build_guidance_graph(FEATURES, graph=_graph())
    assert v.modalities == ("rna", "protein")
    assert torch.equal(v.edge_index, shared.edge_index)


def test_build_errors():
    with pytest.raises(TypeError, match="at most one of graph, mapping, edges; got mapping, edges"):
        build_guidance_graph(FEATURES, mapping=MAPPING, edges=([0], [0]))
    with pytest.raises(TypeError, match="edges must be a DataFrame of feature names or a tuple"):
        build_guidance_graph(FEATURES, edges={"src": [0]})
    with pytest.raises(TypeError, match="edges must be"):
        build_guidance_graph(FEATURES, edges=([0],))
    with pytest.raises(DataError, match="share no feature name"):
        build_guidance_graph({"a": ["x"], "b": ["y"]})
    with pytest.raises(DataError, match="CD8B"):
        build_guidance_graph(FEATURES, edges=pd.DataFrame({"rna": ["CD8B"], "protein": ["CD8"]}))


def test_cross_modal_edges_type_error():
    with pytest.raises(TypeError, match="node_ranges"):
        cross_modal_edges(Data(edge_index=torch.zeros(2, 1, dtype=torch.long)))
