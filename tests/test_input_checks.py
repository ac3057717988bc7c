"""Every row of docs/input_checks.md: the error type, a message naming the problem, input unchanged.

Each check is one registered case: a function that spoils a fresh, valid input and returns the
call that must fail. The runner asserts the exception type, that the message contains the
expected parts (modality, field, ...), and that the user's AnnData objects (X, layers, obs, var)
and graph inputs are unchanged afterwards. A last test keeps the ids here and the table in the
docs equal.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch_geometric.data import Data

from diagvi import DataError
from diagvi.checks import check_adatas, likelihood_support
from diagvi.data import (
    UNLABELED,
    ModalitySetup,
    PairedDataModule,
    read_modalities,
    read_modality,
    split_indices,
)
from diagvi.graph import (
    build_guidance_graph,
    graph_from_mapping,
    validate_graph,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "input_checks.md"
KINDS = {"dense": np.asarray, "csr": sp.csr_matrix, "csc": sp.csc_matrix}
COUNT_LIKELIHOODS = ("nb", "zinb", "nbmixture")

# ---------------------------------------------------------------------------------------------
# a valid pair and helpers


def make_adata(n_obs, n_vars, prefix, kind="dense", seed=0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(2.0, size=(n_obs, n_vars)).astype(np.float32) + 1  # no all-zero cell
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical(np.array(["b0", "b1"])[np.arange(n_obs) % 2]),
            "ct": np.array(["T", "B", "unknown"], dtype=object)[np.arange(n_obs) % 3],
        },
        index=[f"{prefix}{i}" for i in range(n_obs)],
    )
    var = pd.DataFrame(index=[f"{prefix}_f{j}" for j in range(n_vars)])
    return ad.AnnData(KINDS[kind](X), obs=obs, var=var, layers={"counts": KINDS[kind](X.copy())})


def make_pair(kind="dense"):
    adatas = {"rna": make_adata(10, 6, "r", kind), "protein": make_adata(8, 4, "p", kind, 1)}
    setups = {
        "rna": ModalitySetup(batch_key="batch", labels_key="ct"),
        "protein": ModalitySetup(labels_key="ct"),
    }
    return adatas, setups


def set_entry(adata, i, j, value, layer=None):
    """Put ``value`` at (i, j) of X (or a layer), keeping the matrix kind."""
    M = adata.X if layer is None else adata.layers[layer]
    dense = M.toarray() if sp.issparse(M) else np.array(M)
    dense = dense.astype(np.float64)
    dense[i, j] = value
    new = type(M)(dense) if sp.issparse(M) else dense
    if layer is None:
        adata.X = new
    else:
        adata.layers[layer] = new


def same_matrix(a, b):
    if a is None or b is None:
        return a is None and b is None
    if sp.issparse(a) != sp.issparse(b) or a.dtype != b.dtype:
        return False
    a = a.toarray() if sp.issparse(a) else np.asarray(a)
    b = b.toarray() if sp.issparse(b) else np.asarray(b)
    return np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def assert_unchanged(adatas, before):
    for m, b in before.items():
        a = adatas[m]
        assert a.shape == b.shape, m
        assert same_matrix(a.X, b.X), m
        assert set(a.layers) == set(b.layers), m
        for k in b.layers:
            assert same_matrix(a.layers[k], b.layers[k]), (m, k)
        pd.testing.assert_frame_equal(a.obs, b.obs)
        pd.testing.assert_frame_equal(a.var, b.var)
        assert list(a.uns) == list(b.uns)


def snapshot(adatas):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AnnData warns about duplicated names on copy
        return {m: a.copy() for m, a in adatas.items() if isinstance(a, ad.AnnData)}


def check_raises(call, exc, parts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc) as err:
            call()
    assert type(err.value) is exc  # DataError, not a plain ValueError, and vice versa
    msg = str(err.value)
    for part in parts:
        assert part in msg, f"{part!r} not in message: {msg}"
    return msg


# ---------------------------------------------------------------------------------------------
# data layer cases: (adatas, setups) -> the failing call

DATA_CASES: dict[str, tuple[Callable, type, tuple[str, ...], bool]] = {}


def data_case(case_id: str, exc: type, *parts: str, kinds: bool = False):
    """Register a data-layer case; ``kinds``: run it on dense, CSR and CSC matrices."""

    def add(fn):
        DATA_CASES[case_id] = (fn, exc, parts, kinds)
        return fn

    return add


@data_case("adatas-type", TypeError, "dict", "list")
def _(a, s):
    return lambda: read_modalities(list(a.values()), s)


@data_case("anndata-type", TypeError, "'protein'", "AnnData", "DataFrame")
def _(a, s):
    df = a["protein"].to_df()
    return lambda: read_modalities({"rna": a["rna"], "protein": df}, s)


@data_case("n-modalities", DataError, "exactly two modalities", "got 3", "'atac'")
def _(a, s):
    extra = make_adata(5, 3, "a")
    return lambda: read_modalities({**a, "atac": extra}, {**s, "atac": ModalitySetup()})


@data_case("name-type", TypeError, "modality names must be str", "1")
def _(a, s):
    return lambda: read_modalities({"rna": a["rna"], 1: a["protein"]}, {**s, 1: s["protein"]})


@data_case("name-invalid", DataError, "modality name 'weight'", "rename")
def _(a, s):
    return lambda: read_modalities(
        {"rna": a["rna"], "weight": a["protein"]}, {**s, "weight": s["protein"]}
    )


@data_case("name-clash", DataError, "'rna'", "'RNA'", "clash")
def _(a, s):
    return lambda: read_modalities({"rna": a["rna"], "RNA": a["protein"]}, {**s, "RNA": s["rna"]})


@data_case("setups-type", TypeError, "setups", "ModalitySetup", "list")
def _(a, s):
    return lambda: read_modalities(a, list(s.values()))


@data_case("setup-missing", DataError, "no setup", "'protein'")
def _(a, s):
    return lambda: read_modalities(a, {"rna": s["rna"]})


@data_case("setup-type", TypeError, "'rna'", "ModalitySetup", "dict")
def _(a, s):
    return lambda: read_modalities(a, {**s, "rna": {"layer": None}})


@data_case("setup-field-type", TypeError, "ModalitySetup.layer", "3")
def _(a, s):
    return lambda: ModalitySetup(layer=3)


@data_case("empty-policy", DataError, "ModalitySetup.empty", "'keep'", "'drop'")
def _(a, s):
    return lambda: ModalitySetup(empty="keep")


@data_case("likelihood-unknown", DataError, "'rna'", "unknown likelihood 'poisson'", "nb")
def _(a, s):
    return lambda: read_modalities(a, {**s, "rna": ModalitySetup(likelihood="poisson")})


@data_case("encoder-pcs", DataError, "ModalitySetup.encoder_pcs", "'30'", "positive integer")
def _(a, s):
    return lambda: ModalitySetup(encoder_pcs="30")


@data_case("encoder-pcs-too-many", DataError, "'protein'", "encoder_pcs=5", "its 4 features")
def _(a, s):
    return lambda: read_modalities(a, {**s, "protein": ModalitySetup(encoder_pcs=5)})


@data_case("modality-empty", DataError, "'protein'", "is empty", "8 cells x 0 features")
def _(a, s):
    a["protein"] = a["protein"][:, :0].copy()
    return lambda: read_modalities(a, s)


@data_case("obs-names-duplicated", DataError, "'rna'", "duplicated obs_names", "'r1'")
def _(a, s):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a["rna"].obs_names = ["r0", "r1", "r1"] + [f"x{i}" for i in range(7)]
    return lambda: read_modalities(a, s)


@data_case("var-names-duplicated", DataError, "'protein'", "duplicated var_names", "make_unique")
def _(a, s):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a["protein"].var_names = ["CD3", "CD4", "CD3", "CD8"]
    return lambda: read_modalities(a, s)


@data_case("layer-missing", DataError, "'rna'", "layer 'raw'", "not found", "'counts'")
def _(a, s):
    return lambda: read_modalities(a, {**s, "rna": ModalitySetup(layer="raw")})


@data_case("x-missing", DataError, "'protein'", "X is empty", "layer=")
def _(a, s):
    p = a["protein"]
    a["protein"] = ad.AnnData(obs=p.obs.copy(), var=p.var.copy())
    return lambda: read_modalities(a, s)


@data_case("dtype", TypeError, "'rna'", "layer 'text'", "real numbers", "object")
def _(a, s):
    a["rna"].layers["text"] = np.full(a["rna"].shape, "1", dtype=object)
    return lambda: read_modalities(a, {**s, "rna": ModalitySetup(layer="text")})


@data_case("batch-key-missing", DataError, "'rna'", "batch_key 'donor'", "columns", "'batch'")
def _(a, s):
    return lambda: read_modalities(a, {**s, "rna": ModalitySetup(batch_key="donor")})


@data_case("batch-missing-values", DataError, "'rna'", "batch_key 'batch'", "missing", "'r3'")
def _(a, s):
    a["rna"].obs["batch"] = a["rna"].obs["batch"].astype(object)
    a["rna"].obs.loc["r3", "batch"] = np.nan
    return lambda: read_modalities(a, s)


@data_case("labels-key-missing", DataError, "'protein'", "labels_key 'celltype'", "'ct'")
def _(a, s):
    return lambda: read_modalities(a, {**s, "protein": ModalitySetup(labels_key="celltype")})


@data_case(
    "non-finite[X]", DataError, "'rna'", "finite", "NaN or Inf", "'r2'", "'r_f3'", kinds=True
)
def _(a, s):
    set_entry(a["rna"], 2, 3, np.nan)
    set_entry(a["rna"], 4, 1, np.inf)
    return lambda: read_modalities(a, s)


@data_case("non-finite[layer]", DataError, "'rna'", "layer 'counts'", "NaN or Inf", kinds=True)
def _(a, s):
    set_entry(a["rna"], 0, 0, -np.inf, layer="counts")
    return lambda: read_modalities(a, {**s, "rna": ModalitySetup(layer="counts")})


def _negative(likelihood):
    def case(a, s):
        set_entry(a["protein"], 1, 2, -2.0)
        return lambda: read_modalities(a, {**s, "protein": ModalitySetup(likelihood=likelihood)})

    return case


for _lik in (*COUNT_LIKELIHOODS, "ziln", "zig"):
    data_case(
        f"negative[{_lik}]",
        DataError,
        "'protein'",
        f"'{_lik}'",
        "non-negative",
        "1 negative value",
        "-2 at cell 'p1', feature 'p_f2'",
        kinds=True,
    )(_negative(_lik))


@data_case(
    "log1pnormal-range", DataError, "'protein'", "'log1pnormal'", "> -1", "<= -1", kinds=True
)
def _(a, s):
    set_entry(a["protein"], 0, 0, -1.0)
    return lambda: read_modalities(a, {**s, "protein": ModalitySetup(likelihood="log1pnormal")})


def _non_integer(likelihood):
    def case(a, s):
        set_entry(a["rna"], 3, 0, 2.5)
        return lambda: read_modalities(a, {**s, "rna": ModalitySetup(likelihood=likelihood)})

    return case


for _lik in COUNT_LIKELIHOODS:
    data_case(
        f"non-integer[{_lik}]", DataError, "'rna'", f"'{_lik}'", "integer", "2.5", kinds=True
    )(_non_integer(_lik))


@data_case(
    "all-zero-modality", DataError, "'protein'", "every value of X is 0", "layer", kinds=True
)
def _(a, s):
    set_entry(a["protein"], slice(None), slice(None), 0.0)
    return lambda: read_modalities(a, s)


@data_case("empty-cells-features", DataError, "'rna'", "all-zero cell", "'r4'", "empty='error'")
def _(a, s):
    set_entry(a["rna"], 4, slice(None), 0.0)
    return lambda: read_modalities(a, {**s, "rna": ModalitySetup(empty="error")})


@data_case("all-unlabelled", DataError, "'protein'", "every cell is unlabelled", "'ct'")
def _(a, s):
    a["protein"].obs["ct"] = ["unknown"] * 4 + [np.nan] * 4
    return lambda: read_modalities(a, s)


@data_case("val-fraction", DataError, "val_fraction", "[0, 1]", "1.5")
def _(a, s):
    return lambda: split_indices(10, 1.5, seed=0)


def _data_params():
    for case_id, (_, _, _, kinds) in DATA_CASES.items():
        for kind in KINDS if kinds else ["dense"]:
            yield pytest.param(case_id, kind, id=f"{case_id}-{kind}")


@pytest.mark.parametrize(("case_id", "kind"), list(_data_params()))
def test_data_check(case_id, kind):
    fn, exc, parts, _ = DATA_CASES[case_id]
    adatas, setups = make_pair(kind)
    call = fn(adatas, setups)
    before = snapshot(adatas)
    check_raises(call, exc, parts)
    assert_unchanged(adatas, before)


# ---------------------------------------------------------------------------------------------
# guidance graph cases

FEATURES = {"rna": ["CD3E", "CD4", "CD8A", "MS4A1"], "protein": ["CD3", "CD4", "CD8", "CD20"]}
MAPPING = pd.DataFrame({"rna": ["CD3E", "CD4", "CD8A"], "protein": ["CD3", "CD4", "CD8"]})
GRAPH_CASES: dict[str, tuple[Callable, type, tuple[str, ...]]] = {}


def graph_case(case_id: str, exc: type, *parts: str):
    def add(fn):
        GRAPH_CASES[case_id] = (fn, exc, parts)
        return fn

    return add


def a_graph(**changes):
    """A valid guidance graph of FEATURES as a plain Data, with ``changes`` applied."""
    g = graph_from_mapping(FEATURES, MAPPING)
    d = Data(edge_index=g.edge_index, edge_weight=g.edge_weight, edge_sign=g.edge_sign)
    d.num_nodes = 8
    for k, v in changes.items():
        if v is None:
            del d[k]
        else:
            d[k] = v
    return d


def with_extra_edges(rows, cols, w=1.0, s=1.0):
    g = a_graph()
    k = len(rows)
    return a_graph(
        edge_index=torch.cat([g.edge_index, torch.tensor([rows, cols])], dim=1),
        edge_weight=torch.cat([g.edge_weight, torch.full((k,), w)]),
        edge_sign=torch.cat([g.edge_sign, torch.full((k,), s)]),
    )


@graph_case("features-type", TypeError, "features must be a mapping", "list")
def _():
    return lambda: build_guidance_graph([["a"], ["b"]])


@graph_case("features-count", DataError, "exactly 2 modalities", "got 1")
def _():
    return lambda: build_guidance_graph({"rna": ["a"]})


@graph_case("features-names-type", TypeError, "features['protein']", "sequence", "str")
def _():
    return lambda: build_guidance_graph({"rna": ["CD4"], "protein": "CD4"})


@graph_case("features-empty", DataError, "modality 'protein' has no features")
def _():
    return lambda: build_guidance_graph({"rna": ["CD4"], "protein": []})


@graph_case("features-duplicated", DataError, "modality 'rna'", "duplicate feature names", "'CD4'")
def _():
    return lambda: build_guidance_graph({"rna": ["CD4", "CD4"], "protein": ["CD4"]})


@graph_case("graph-modality-name", DataError, "modality name 'a.b'")
def _():
    return lambda: build_guidance_graph({"rna": ["CD4"], "a.b": ["CD4"]})


@graph_case("shared-none", DataError, "'rna' and 'protein' share no feature name", "mapping")
def _():
    return lambda: build_guidance_graph({"rna": ["x"], "protein": ["y"]})


@graph_case("mapping-type", TypeError, "mapping must be a DataFrame or a CSV path", "dict")
def _():
    return lambda: build_guidance_graph(FEATURES, mapping={"rna": ["CD4"], "protein": ["CD4"]})


@graph_case("mapping-columns-repeated", DataError, "repeated column", "'rna'")
def _():
    table = pd.concat([MAPPING, MAPPING[["rna"]]], axis=1)
    return lambda: build_guidance_graph(FEATURES, mapping=table)


@graph_case("mapping-column-missing", DataError, "lacks column", "'protein'", "present")
def _():
    return lambda: build_guidance_graph(FEATURES, mapping=MAPPING.rename(columns={"protein": "x"}))


@graph_case(
    "mapping-unknown-names",
    DataError,
    "column 'rna'",
    "modality 'rna'",
    "'CD8B' (did you mean 'CD8A'?)",
    "on_missing='ignore'",
)
def _():
    table = pd.DataFrame({"rna": ["CD4", "CD8B"], "protein": ["CD4", "CD8"]})
    return lambda: build_guidance_graph(FEATURES, mapping=table)


@graph_case("mapping-no-row", DataError, "no row linking", "'rna'", "'protein'")
def _():
    table = pd.DataFrame({"rna": [None], "protein": ["CD4"]})
    return lambda: build_guidance_graph(FEATURES, mapping=table)


@graph_case("mapping-not-numeric", DataError, "column 'weight'", "not numeric", "rows 1")
def _():
    table = MAPPING.iloc[:2].assign(weight=[1.0, "high"])
    return lambda: build_guidance_graph(FEATURES, mapping=table)


@graph_case("on-missing", DataError, "on_missing", "'drop'")
def _():
    return lambda: build_guidance_graph(FEATURES, mapping=MAPPING, on_missing="drop")


@graph_case("edges-dtype", TypeError, "src", "integer feature indices", "float")
def _():
    return lambda: build_guidance_graph(FEATURES, edges=([0.5], [0]))


@graph_case("edges-ndim", DataError, "src must be 1-D")
def _():
    return lambda: build_guidance_graph(FEATURES, edges=([[0]], [[0]]))


@graph_case("edges-length", DataError, "same length", "got 2 and 1")
def _():
    return lambda: build_guidance_graph(FEATURES, edges=([0, 1], [0]))


@graph_case("edges-range", DataError, "dst indexes modality 'protein'", "[0, 4)", "7")
def _():
    return lambda: build_guidance_graph(FEATURES, edges=([0], [7]))


@graph_case("edges-none", DataError, "no edges", "at least one rna-protein edge")
def _():
    return lambda: build_guidance_graph(FEATURES, edges=([], []))


@graph_case("weight-range[edges]", DataError, "weights must lie in (0, 1]", "1.5", "rescale")
def _():
    return lambda: build_guidance_graph(FEATURES, edges=([0, 1], [0, 1], [0.5, 1.5]))


@graph_case("weight-range[mapping]", DataError, "mapping table", "(0, 1]", "0.0")
def _():
    return lambda: build_guidance_graph(FEATURES, mapping=MAPPING.assign(weight=[1.0, 0.0, 0.5]))


@graph_case("weight-range[graph]", DataError, "guidance graph", "(0, 1]")
def _():
    g = a_graph()
    return lambda: validate_graph(a_graph(edge_weight=g.edge_weight * 2), FEATURES)


@graph_case("sign-values[edges]", DataError, "signs must be -1 or +1", "0")
def _():
    return lambda: build_guidance_graph(FEATURES, edges=([0], [0], 1.0, 0))


@graph_case("sign-values[mapping]", DataError, "mapping table", "signs must be -1 or +1", "2")
def _():
    return lambda: build_guidance_graph(FEATURES, mapping=MAPPING.assign(sign=[1, -1, 2]))


@graph_case("sign-values[graph]", DataError, "guidance graph", "signs must be -1 or +1", "0.5")
def _():
    g = a_graph()
    return lambda: validate_graph(a_graph(edge_sign=g.edge_sign * 0.5), FEATURES)


@graph_case("weight-shape", DataError, "weight must be a scalar or have one value per edge")
def _():
    return lambda: build_guidance_graph(FEATURES, edges=([0, 1], [0, 1], [1.0, 1.0, 1.0]))


@graph_case("weight-type", TypeError, "weight must be numeric")
def _():
    return lambda: build_guidance_graph(FEATURES, edges=([0], [0], ["heavy"]))


@graph_case("sign-conflict", DataError, "given both sign +1 and -1", "CD4-CD4", "one sign")
def _():
    return lambda: build_guidance_graph(FEATURES, edges=([1, 1], [1, 1], 1.0, [1, -1]))


@graph_case("graph-type", TypeError, "torch_geometric.data.Data", "dict")
def _():
    return lambda: build_guidance_graph(FEATURES, graph={"edge_index": [[0], [0]]})


@graph_case("graph-attrs", DataError, "lacks edge_weight, edge_sign", "build_guidance_graph")
def _():
    return lambda: build_guidance_graph(FEATURES, graph=a_graph(edge_weight=None, edge_sign=None))


@graph_case("graph-nodes", DataError, "7 nodes", "features number 8", "4 'rna' + 4 'protein'")
def _():
    return lambda: build_guidance_graph(FEATURES, graph=a_graph(num_nodes=7))


@graph_case("graph-edge-index", DataError, "edge_index must be an integer array of shape (2, E)")
def _():
    g = a_graph()
    return lambda: validate_graph(a_graph(edge_index=g.edge_index.T.contiguous()), FEATURES)


@graph_case("graph-edge-attr-shape", DataError, "edge_weight must be a numeric array of shape")
def _():
    return lambda: validate_graph(a_graph(edge_weight=torch.ones(2)), FEATURES)


@graph_case("graph-tensor-type", TypeError, "graph.edge_sign must be a torch.Tensor", "list")
def _():
    g = a_graph()
    return lambda: validate_graph(a_graph(edge_sign=g.edge_sign.tolist()), FEATURES)


@graph_case("graph-range", DataError, "edge_index must lie in [0, 8)", "2 edges")
def _():
    return lambda: validate_graph(with_extra_edges([0, 8], [8, 0]), FEATURES)


@graph_case("graph-self-loops", DataError, "self-loop on every node", "'CD3E'")
def _():
    g = a_graph()
    keep = (g.edge_index[0] != g.edge_index[1]) | (g.edge_index[0] != 0)
    return lambda: validate_graph(
        a_graph(
            edge_index=g.edge_index[:, keep],
            edge_weight=g.edge_weight[keep],
            edge_sign=g.edge_sign[keep],
        ),
        FEATURES,
    )


@graph_case("graph-duplicates", DataError, "duplicated edges", "'CD4->CD4'")
def _():
    return lambda: validate_graph(with_extra_edges([1, 5], [5, 1]), FEATURES)


@graph_case("graph-symmetry", DataError, "symmetric", "'MS4A1->CD20'", "reverse")
def _():
    return lambda: validate_graph(with_extra_edges([3], [7]), FEATURES)


@graph_case("graph-no-cross", DataError, "no edge between 'rna' and 'protein'")
def _():
    loops = torch.arange(8).repeat(2, 1)
    g = a_graph(edge_index=loops, edge_weight=torch.ones(8), edge_sign=torch.ones(8))
    return lambda: validate_graph(g, FEATURES)


@graph_case("sources", TypeError, "at most one of graph, mapping, edges", "mapping, edges")
def _():
    return lambda: build_guidance_graph(FEATURES, mapping=MAPPING, edges=([0], [0]))


@graph_case("edges-type", TypeError, "edges must be a DataFrame of feature names or a tuple")
def _():
    return lambda: build_guidance_graph(FEATURES, edges={"src": [0]})


@pytest.mark.parametrize("case_id", list(GRAPH_CASES))
def test_graph_check(case_id):
    fn, exc, parts = GRAPH_CASES[case_id]
    mapping_before = MAPPING.copy()
    check_raises(fn(), exc, parts)
    pd.testing.assert_frame_equal(MAPPING, mapping_before)


# ---------------------------------------------------------------------------------------------
# the docs list exactly these checks


def test_docs_table_lists_every_case():
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", DOC.read_text(), flags=re.M)
    assert len(rows) == len(set(rows)), "duplicated ids in docs/input_checks.md"
    tested = {re.sub(r"\[.*\]$", "", c) for c in [*DATA_CASES, *GRAPH_CASES]}
    assert set(rows) == tested | {"empty-warn", "empty-drop", "validation-only-category"}


# ---------------------------------------------------------------------------------------------
# checks that handle rather than refuse


def test_failed_validate_graph_leaves_graph_unchanged():
    g = a_graph(num_nodes=7)
    before = {k: v.clone() for k, v in g.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(DataError):
        validate_graph(g, FEATURES)
    for k, v in before.items():
        assert torch.equal(g[k], v)
    assert g.num_nodes == 7


def test_data_error_is_a_value_error_exported_at_top_level():
    import diagvi

    assert diagvi.DataError is DataError and issubclass(DataError, ValueError)


@pytest.mark.parametrize("kind", list(KINDS))
def test_empty_warn_keeps_cells_and_features(kind):
    adatas, setups = make_pair(kind)
    set_entry(adatas["rna"], 4, slice(None), 0.0)
    set_entry(adatas["rna"], slice(None), 2, 0.0)
    before = snapshot(adatas)
    with pytest.warns(UserWarning, match=r"modality 'rna'.*1 all-zero cell.*'r4'.*'r_f2'.*kept"):
        data, _ = read_modalities(adatas, setups)
    assert data["rna"].X.shape == (10, 6)
    assert_unchanged(adatas, before)


@pytest.mark.parametrize("kind", list(KINDS))
def test_empty_drop_drops_cells_keeps_features(kind):
    adatas, setups = make_pair(kind)
    set_entry(adatas["rna"], 4, slice(None), 0.0)
    set_entry(adatas["rna"], slice(None), 2, 0.0)
    before = snapshot(adatas)
    setups["rna"] = ModalitySetup(batch_key="batch", labels_key="ct", empty="drop")
    with pytest.warns(UserWarning, match=r"modality 'rna'.*dropped the cells"):
        data, cats = read_modalities(adatas, setups)
    d = data["rna"]
    kept = [i for i in range(10) if i != 4]
    assert d.X.shape == (9, 6) and list(d.obs_names) == [f"r{i}" for i in kept]
    dense = before["rna"].X.toarray() if sp.issparse(before["rna"].X) else before["rna"].X
    np.testing.assert_array_equal(
        d.X.toarray() if sp.issparse(d.X) else d.X, np.asarray(dense)[kept]
    )
    assert [d.batch_categories[b] for b in d.batch] == [["b0", "b1"][i % 2] for i in kept]
    names = d.label_names(cats)
    assert list(names) == [["T", "B", None][i % 3] for i in kept]
    assert_unchanged(adatas, before)


def test_empty_drop_removes_batches_left_without_cells():
    adatas, setups = make_pair()
    adatas["rna"].obs["batch"] = pd.Categorical(["lonely"] + ["b0"] * 9)
    set_entry(adatas["rna"], 0, slice(None), 0.0)
    setups["rna"] = ModalitySetup(batch_key="batch", empty="drop")
    with pytest.warns(UserWarning):
        data, _ = read_modalities(adatas, setups)
    assert data["rna"].batch_categories == ["b0"]
    np.testing.assert_array_equal(data["rna"].batch, np.zeros(9))


def test_unused_batch_categories_are_not_batches():
    adata = make_adata(6, 3, "c")
    adata.obs["batch"] = pd.Categorical(["a"] * 6, categories=["a", "gone"])
    d = read_modality("rna", adata, ModalitySetup(batch_key="batch"))
    assert d.batch_categories == ["a"]
    assert list(adata.obs["batch"].cat.categories) == ["a", "gone"]  # the user's column is kept


def test_log1pnormal_accepts_values_above_minus_one():
    adatas, setups = make_pair()
    set_entry(adatas["protein"], 0, 0, -0.5)
    setups["protein"] = ModalitySetup(likelihood="log1pnormal")
    data, _ = read_modalities(adatas, setups)
    assert data["protein"].X[0, 0] == np.float32(-0.5)


@pytest.mark.parametrize(
    ("likelihood", "support"),
    [
        ("nb", (0.0, False, True)),
        ("zinb", (0.0, False, True)),
        ("nbmixture", (0.0, False, True)),
        ("ziln", (0.0, False, False)),
        ("zig", (0.0, False, False)),
        ("log1pnormal", (-1.0, True, False)),
        ("normal", (-np.inf, False, False)),
    ],
)
def test_likelihood_support_read_from_the_distribution(likelihood, support):
    assert tuple(likelihood_support(likelihood)) == support


def test_validation_only_category_moves_one_cell_to_training():
    # "rare" has 2 of 40 cells; seeds where both fall in validation are fixed up
    batch = np.zeros(40, dtype=np.int64)
    batch[[3, 17]] = 1
    labels = np.full(40, UNLABELED)
    labels[[5]] = 0
    for seed in range(200):
        train, val = split_indices(40, 0.5, seed, groups=(batch, labels))
        assert set(batch[train]) == {0, 1} and 0 in labels[train]
        assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 40
        assert len(val) in (18, 19, 20)


def test_data_module_keeps_every_category_in_training():
    adatas, setups = make_pair()
    adatas["rna"].obs["batch"] = pd.Categorical(["rare"] + ["common"] * 9)
    data, _ = read_modalities(adatas, setups)
    for seed in range(20):
        dm = PairedDataModule(data, val_fraction=0.5, seed=seed)
        rare = data["rna"].batch_categories.index("rare")
        assert rare in data["rna"].batch[dm.train_idx["rna"]]


def test_check_adatas_accepts_two_anndata_and_returns_a_dict():
    adatas, _ = make_pair()
    out = check_adatas(adatas)
    assert out == adatas and out is not adatas


def test_check_adatas_duck_types_mudata():
    adatas, _ = make_pair()
    MuData = type("MuData", (), {"__init__": lambda self, mod: setattr(self, "mod", mod)})
    assert check_adatas(MuData(adatas)) == adatas
