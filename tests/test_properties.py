"""Property tests: the data layer, the split and the graph builders on random input.

Every call either works, and then its output satisfies the invariants (shapes, dtypes, codes in
range, a symmetric guidance graph with self-loops, weights in (0, 1], signs +-1), or raises
DataError / TypeError, never another exception; the user's objects are never modified.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch_geometric.data import Data

from diagvi import DataError
from diagvi.checks import likelihood_support
from diagvi.data import (
    UNLABELED,
    ModalitySetup,
    read_modalities,
    read_modality,
    split_indices,
)
from diagvi.graph import build_guidance_graph, validate_graph
from diagvi.registry import LIKELIHOODS

# no .hypothesis folder in the repository; a failure prints its falsifying example
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
KINDS = {"dense": np.asarray, "csr": sp.csr_matrix, "csc": sp.csc_matrix}
DTYPES = [np.int32, np.int64, np.float32, np.float64]
LABELS = ["T", "B", "unknown", None, np.nan, "NK", 7]
GOOD_NAMES = [("rna", "protein"), ("atac", "rna")]
BAD_NAMES = [("rna", "RNA"), ("rna", "weight"), ("a.b", "c")]


def rarely(draw) -> bool:
    """True about one time in eight: defects are rare, so most examples reach the success path.

    Hypothesis favours the first and last elements of ``sampled_from``, so the rare value sits
    in the middle.
    """
    return draw(st.sampled_from([False] * 4 + [True] + [False] * 3))


def modality_names(draw) -> tuple[str, str]:
    return draw(st.sampled_from(BAD_NAMES if rarely(draw) else GOOD_NAMES))


# ---------------------------------------------------------------------------------------------
# random AnnData

# at most one defect per modality, so that most examples reach the success path
DEFECTS = [
    *["value", "obs_names", "batch_nan", "no_layer", "donor", "empty_error"],
    *["all_zero", "unlabelled"],
]


@st.composite
def matrices(draw, n_obs: int, n_vars: int, spoil: bool):
    """Counts of a random dtype and sparsity; ``spoil``: one bad value (negative, NaN, ...)."""
    dtype = draw(st.sampled_from(DTYPES))
    size = n_obs * n_vars
    values = draw(st.lists(st.sampled_from([0, 1, 2, 5, 0]), min_size=size, max_size=size))
    X = np.array(values, dtype=np.float64).reshape(n_obs, n_vars)
    i, j = draw(st.integers(0, n_obs - 1)), draw(st.integers(0, n_vars - 1))
    X[i, j] = draw(st.sampled_from([1, 2, 5]))  # not all zero
    if spoil:
        i, j = draw(st.integers(0, n_obs - 1)), draw(st.integers(0, n_vars - 1))
        X[i, j] = draw(st.sampled_from([-1.0, -0.5, 2.5, np.nan, np.inf, 1e39]))
    if np.issubdtype(dtype, np.integer):
        X = np.where(np.isfinite(X) & (np.abs(X) < 1e6), X, 0).astype(dtype)  # ints: trunc
    else:
        with np.errstate(over="ignore"):
            X = X.astype(dtype)
    return KINDS[draw(st.sampled_from(list(KINDS)))](X)


@st.composite
def modalities(draw, prefix: str):
    """An (AnnData, ModalitySetup) pair: clean six times in seven, else with one defect."""
    defect = draw(st.sampled_from([None] * 24 + DEFECTS + [None] * 24))
    n_obs, n_vars = draw(st.integers(2, 10)), draw(st.integers(1, 6))
    X = draw(matrices(n_obs, n_vars, spoil=defect == "value"))
    if defect == "all_zero":
        X = X * 0
    obs_names = [f"{prefix}{i}" for i in range(n_obs)]
    if defect == "obs_names":
        obs_names[-1] = obs_names[0]
    batches = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=n_obs, max_size=n_obs))
    if defect == "batch_nan":
        batches[draw(st.integers(0, n_obs - 1))] = None
    labels = draw(st.lists(st.sampled_from(LABELS), min_size=n_obs, max_size=n_obs))
    labels[draw(st.integers(0, n_obs - 1))] = draw(st.sampled_from(["T", "B", 7]))
    if defect == "unlabelled":
        labels = draw(
            st.lists(st.sampled_from(["unknown", None, np.nan]), min_size=n_obs, max_size=n_obs)
        )
    obs = pd.DataFrame({"batch": batches, "ct": pd.Series(labels, dtype=object)}, index=obs_names)
    if draw(st.booleans()):
        obs["batch"] = obs["batch"].astype("category")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicated names
        adata = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_vars)]))
    if defect != "no_layer":
        adata.layers["counts"] = X.copy()
    setup = ModalitySetup(
        layer=draw(st.sampled_from([None, "counts"])) if defect != "no_layer" else "counts",
        batch_key="donor" if defect == "donor" else draw(st.sampled_from([None, "batch"])),
        labels_key=draw(st.sampled_from([None, "ct", "ct"])),
        likelihood=draw(st.sampled_from(sorted(LIKELIHOODS))),
        empty="error" if defect == "empty_error" else draw(st.sampled_from(["warn", "drop"])),
    )
    return adata, setup


def snapshot(adatas):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {m: a.copy() for m, a in adatas.items()}


def dense(X):
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def assert_unchanged(adatas, before):
    for m, b in before.items():
        a = adatas[m]
        assert type(a.X) is type(b.X) and a.X.dtype == b.X.dtype
        np.testing.assert_array_equal(dense(a.X), dense(b.X))
        assert set(a.layers) == set(b.layers)
        for k in b.layers:
            np.testing.assert_array_equal(dense(a.layers[k]), dense(b.layers[k]))
        pd.testing.assert_frame_equal(a.obs, b.obs)
        pd.testing.assert_frame_equal(a.var, b.var)


def check_modality(d, adata, setup, kept, categories):
    """Invariants of one ModalityData read from ``adata`` (``kept``: positions of its cells)."""
    source = adata.X if setup.layer is None else adata.layers[setup.layer]
    assert d.X.dtype == np.float32
    assert sp.issparse(d.X) == sp.issparse(source)
    if sp.issparse(d.X):
        assert d.X.format == "csr"
    assert d.X.shape == (len(kept), adata.n_vars)
    np.testing.assert_array_equal(dense(d.X), dense(source).astype(np.float32)[kept])
    assert list(d.obs_names) == list(adata.obs_names[kept])
    assert list(d.var_names) == list(adata.var_names)
    if setup.empty != "drop":
        assert len(kept) == adata.n_obs
    values = d.X.data if sp.issparse(d.X) else d.X
    support = likelihood_support(setup.likelihood)
    assert np.isfinite(values).all()
    assert (values > support.lower).all() if support.strict else (values >= support.lower).all()
    if support.integer:
        assert (np.mod(values, 1) == 0).all()
    # batches: codes 0 .. B-1, every batch has a cell, names match obs
    assert d.batch.dtype == np.int64 and d.batch.shape == (len(kept),)
    assert list(np.unique(d.batch)) == list(range(len(d.batch_categories)))
    if setup.batch_key is not None:
        names = adata.obs[setup.batch_key].astype(str).to_numpy()[kept]
        assert [d.batch_categories[b] for b in d.batch] == list(names)
    # labels: -1 or a class whose name is the cell's label
    assert d.labels.dtype == np.int64 and d.labels.shape == (len(kept),)
    assert ((d.labels >= UNLABELED) & (d.labels < len(categories))).all()
    if setup.labels_key is None:
        assert (d.labels == UNLABELED).all()
    else:
        raw = adata.obs[setup.labels_key].to_numpy()[kept]
        for code, value in zip(d.labels, raw, strict=True):
            unlabelled = pd.isna(value) or str(value) == setup.unlabeled_category
            assert (code == UNLABELED) if unlabelled else categories[code] == str(value)


@settings(SETTINGS, max_examples=150)  # both modalities must be clean to reach the success path
@given(
    names=st.builds(lambda d: modality_names(d.draw), st.data()),
    first=modalities("r"),
    second=modalities("p"),
)
def test_read_modalities_works_or_raises_data_error(names, first, second):
    adatas = dict(zip(names, (first[0], second[0]), strict=True))
    setups_ = dict(zip(names, (first[1], second[1]), strict=True))
    before = snapshot(adatas)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data, categories = read_modalities(adatas, setups_)
    except (DataError, TypeError) as err:
        event(f"{type(err).__name__}: {str(err)[:40]}")
        assert_unchanged(adatas, before)
        return
    event("read")
    assert_unchanged(adatas, before)
    assert list(data) == list(names)
    assert list(categories) == sorted(set(categories)) and "unknown" not in categories
    assert all(isinstance(c, str) for c in categories)
    for m, d in data.items():
        kept = np.flatnonzero(np.isin(adatas[m].obs_names, d.obs_names))
        check_modality(d, adatas[m], setups_[m], kept, categories)


@SETTINGS
@given(modality=modalities("c"))
def test_read_modality_works_or_raises_data_error(modality):
    adata, setup = modality
    before = snapshot({"m": adata})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = read_modality("m", adata, setup)
    except (DataError, TypeError) as err:
        event(f"{type(err).__name__}: {str(err)[:40]}")
        assert_unchanged({"m": adata}, before)
        return
    event("read")
    assert_unchanged({"m": adata}, before)
    check_modality(d, adata, setup, np.arange(adata.n_obs), ())


# ---------------------------------------------------------------------------------------------
# split


@SETTINGS
@given(
    n=st.integers(1, 300),
    fraction=st.floats(0, 1),
    bad_fraction=st.sampled_from([None] * 4 + [-0.5, 1.5, float("nan")] + [None] * 4),
    seed=st.integers(0, 2**32 - 1),
    n_groups=st.integers(0, 2),
    n_categories=st.integers(1, 8),
    data=st.data(),
)
def test_split_is_a_partition_that_trains_every_category(
    n, fraction, bad_fraction, seed, n_groups, n_categories, data
):
    fraction = fraction if bad_fraction is None else bad_fraction
    codes = st.lists(st.integers(UNLABELED, n_categories - 1), min_size=n, max_size=n)
    groups = [np.array(data.draw(codes), dtype=np.int64) for _ in range(n_groups)]
    try:
        train, val = split_indices(n, fraction, seed, groups=groups)
    except DataError:
        event("DataError")
        assert not 0 <= fraction <= 1
        return
    event("split")
    assert len(train) >= 1
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(n))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    target = min(int(round(n * fraction)), n - 1)
    assert target - n_groups * n_categories <= len(val) <= target
    for g in groups:
        assert set(g[g >= 0]) <= set(g[train])
    again = split_indices(n, fraction, seed, groups=groups)
    np.testing.assert_array_equal(again[0], train)


# ---------------------------------------------------------------------------------------------
# guidance graphs

FEATURE_NAMES = ["CD3", "CD4", "CD8", "cd4", "MS4A1", "CD19", "1", "é", ""]


def check_graph(g, n1, n2, built: bool = True):
    """Invariants of every guidance graph diagvi returns.

    ``built``: made by a builder, whose self-loops have weight 1; a validated user graph needs
    sign +1 self-loops of any weight in (0, 1].
    """
    n = n1 + n2
    assert isinstance(g, Data) and g.num_nodes == n
    assert g.edge_index.dtype == torch.int64 and g.edge_index.shape[0] == 2
    assert g.edge_weight.dtype == torch.float32 and g.edge_sign.dtype == torch.float32
    row, col = g.edge_index.numpy()
    w, s = g.edge_weight.numpy(), g.edge_sign.numpy()
    assert ((row >= 0) & (row < n) & (col >= 0) & (col < n)).all()
    assert ((w > 0) & (w <= 1)).all() and np.isin(s, [-1.0, 1.0]).all()
    edges = {(r, c): (a, b) for r, c, a, b in zip(row, col, w, s, strict=True)}
    assert len(edges) == len(row), "duplicate edges"
    loops = [edges[(i, i)] for i in range(n)]
    assert all(ws == (1.0, 1.0) if built else ws[1] == 1.0 for ws in loops), "self-loops"
    assert all(edges.get((c, r)) == ws for (r, c), ws in edges.items()), "symmetry"
    assert ((row < n1) & (col >= n1)).any(), "no cross-modal edge"
    assert list(g.node_ranges.values()) == [(0, n1), (n1, n)]
    return edges


@st.composite
def feature_sets(draw):
    names = modality_names(draw)
    if rarely(draw):  # empty or duplicated names
        lists = [draw(st.lists(st.sampled_from(FEATURE_NAMES), max_size=4)) for _ in names]
    else:
        features = st.lists(st.sampled_from(FEATURE_NAMES), min_size=1, max_size=6, unique=True)
        lists = [draw(features) for _ in names]
    return dict(zip(names, lists, strict=True))


@st.composite
def mapping_tables(draw, features):
    mods = list(features)
    n = draw(st.integers(0, 8))
    pools = [[*features[m], None, *(["CD8B", "unknown"] if rarely(draw) else [])] for m in mods]

    def column(values):
        return draw(st.lists(st.sampled_from(values), min_size=n, max_size=n))

    table = pd.DataFrame({m: column(p) for m, p in zip(mods, pools, strict=True)})
    if draw(st.booleans()):
        table["weight"] = column([1.0, 0.5, 0.01, *([0.0, 1.5, np.nan] if rarely(draw) else [])])
    if draw(st.booleans()):
        table["sign"] = column([1, -1, *([0, 2] if rarely(draw) else [])])
    return table


def graph_inputs(draw, features):
    """Keyword arguments of one random call to build_guidance_graph."""
    source = draw(st.sampled_from(["shared", "mapping", "edges", "graph"]))
    n1, n2 = (len(v) for v in features.values())
    if source == "shared":
        return {}
    if source == "mapping":
        on_missing = draw(st.sampled_from(["raise", "ignore"]))
        return {"mapping": draw(mapping_tables(features)), "on_missing": on_missing}
    k = draw(st.integers(0, 6))
    lo, hi = (-1, 1) if rarely(draw) else (0, 0)  # out-of-range indices, rarely
    src = draw(st.lists(st.integers(lo, max(lo, n1 - 1 + hi)), min_size=k, max_size=k))
    dst = draw(st.lists(st.integers(lo, max(lo, n2 - 1 + hi)), min_size=k, max_size=k))
    weight = draw(st.sampled_from([0.0, 2.0] if rarely(draw) else [None, 1.0, 0.3]))
    if draw(st.booleans()):
        weight = draw(st.lists(st.sampled_from([1.0, 0.3, 0.01]), min_size=k, max_size=k))
    sign = draw(st.sampled_from([0, 2] if rarely(draw) else [None, 1, -1]))
    if source == "edges":
        return {"edges": (src, dst, weight, sign)}
    return {"graph": random_data(draw, features, src, dst, weight, sign)}


def random_data(draw, features, src, dst, weight, sign):
    """A Data object: often a valid graph with one random defect."""
    try:
        g = build_guidance_graph(features, edges=(src, dst, weight, sign))
        g = Data(edge_index=g.edge_index, edge_weight=g.edge_weight, edge_sign=g.edge_sign)
    except (DataError, TypeError):
        g = Data(edge_index=torch.zeros(2, 1, dtype=torch.long))
    e = g.edge_index.shape[1]
    g.num_nodes = sum(len(v) for v in features.values())
    defects = ["drop", "weight", "sign", "nodes", "transpose", "attr"]
    defect = draw(st.sampled_from(defects)) if draw(st.booleans()) else "none"
    if defect == "drop" and e > 1:
        keep = torch.ones(e, dtype=torch.bool)
        keep[draw(st.integers(0, e - 1))] = False
        for key in ("edge_index", "edge_weight", "edge_sign"):
            if g.get(key) is not None:
                g[key] = g[key][..., keep]
    elif defect == "weight" and g.get("edge_weight") is not None:
        g.edge_weight = g.edge_weight * draw(st.sampled_from([0.5, 2.0, 0.0, float("nan")]))
    elif defect == "sign" and g.get("edge_sign") is not None:
        g.edge_sign = -g.edge_sign
    elif defect == "nodes":
        g.num_nodes = g.num_nodes + draw(st.sampled_from([-1, 1]))
    elif defect == "transpose":
        g.edge_index = g.edge_index.T.contiguous()
    elif defect == "attr":
        del g.edge_index
    return g


@settings(SETTINGS, max_examples=150)  # cheap, and four sources to cover
@given(data=st.data())
def test_build_guidance_graph_works_or_raises_data_error(data):
    features = data.draw(feature_sets())
    kwargs = graph_inputs(data.draw, features)
    mapping_before = kwargs["mapping"].copy() if "mapping" in kwargs else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # on_missing="ignore" warns
            g = build_guidance_graph(features, **kwargs)
    except (DataError, TypeError) as err:
        event(f"{type(err).__name__}: {str(err)[:40]}")
        return
    finally:
        if mapping_before is not None:
            pd.testing.assert_frame_equal(kwargs["mapping"], mapping_before)
    event(f"built from {next(iter(kwargs), 'shared names')}")
    n1, n2 = (len(v) for v in features.values())
    edges = check_graph(g, n1, n2, built="graph" not in kwargs)
    assert g.modalities == tuple(features)
    out = validate_graph(g, features)  # what a builder returns passes validation
    assert torch.equal(out.edge_index, g.edge_index)
    if "mapping" in kwargs:  # every cross-modal edge is a row of the table
        names = [*features.values()]
        table = kwargs["mapping"].dropna(subset=list(features))
        pairs = set(zip(*(table[m].astype(str) for m in features), strict=True))
        for r, c in edges:
            if r < n1 <= c:
                assert (names[0][r], names[1][c - n1]) in pairs


@pytest.mark.parametrize("seed", range(3))
def test_validate_graph_accepts_a_permuted_valid_graph(seed):
    rng = np.random.default_rng(seed)
    features = {"rna": [f"g{i}" for i in range(30)], "protein": [f"p{i}" for i in range(12)]}
    src, dst = rng.integers(0, 30, 40), rng.integers(0, 12, 40)
    g = build_guidance_graph(features, edges=(src, dst, rng.uniform(0.1, 1, 40), 1))
    perm = torch.from_numpy(rng.permutation(g.edge_index.shape[1]))
    shuffled = Data(
        edge_index=g.edge_index[:, perm],
        edge_weight=g.edge_weight[perm],
        edge_sign=g.edge_sign[perm],
        num_nodes=42,
    )
    out = validate_graph(shuffled, features)
    check_graph(out, 30, 12)
