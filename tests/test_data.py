"""Tests for diagvi.data: reading and validating modalities, labels, splits and paired loaders."""

import copy
import dataclasses
import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from diagvi.data import (
    UNLABELED,
    ModalitySetup,
    PairedDataModule,
    PairedSampler,
    paired_loader,
    read_modalities,
    read_modality,
    shared_order,
    split_indices,
    with_dense_rows,
)
from diagvi.errors import DataError
from diagvi.synthetic import make_synthetic_pair

# ---------------------------------------------------------------------------------------------
# helpers


def counts(n_obs=6, n_vars=5, seed=0, dtype=np.float64):
    """Integer-valued count matrix with some zeros."""
    rng = np.random.default_rng(seed)
    return rng.poisson(1.5, size=(n_obs, n_vars)).astype(dtype)


def make_adata(X=None, n_obs=6, n_vars=5, obs=None, prefix="c", layers=None):
    if X is None:
        X = counts(n_obs, n_vars)
    n_obs, n_vars = X.shape
    if obs is None:
        obs = pd.DataFrame(index=[f"{prefix}{i}" for i in range(n_obs)])
    var = pd.DataFrame(index=[f"f{j}" for j in range(n_vars)])
    return ad.AnnData(X, obs=obs, var=var, layers=layers)


def labelled_adata(labels, prefix="c", n_vars=4):
    obs = pd.DataFrame({"ct": labels}, index=[f"{prefix}{i}" for i in range(len(labels))])
    return make_adata(counts(len(labels), n_vars), obs=obs, prefix=prefix)


def dense(X):
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def assert_same_matrix(a, b):
    assert type(a) is type(b)
    if sp.issparse(a):
        assert a.format == b.format
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a.toarray(), b.toarray())
    else:
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def assert_adata_unchanged(adata, before):
    assert adata.shape == before.shape
    assert_same_matrix(adata.X, before.X)
    assert set(adata.layers.keys()) == set(before.layers.keys())
    for k in before.layers:
        assert_same_matrix(adata.layers[k], before.layers[k])
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    pd.testing.assert_frame_equal(adata.var, before.var)


def matrix_buffers(X):
    return [X.data, X.indices, X.indptr] if sp.issparse(X) else [X]


MATRIX_KINDS = {
    "dense": lambda M: M,
    "csr": sp.csr_matrix,
    "csc": sp.csc_matrix,
}


# ---------------------------------------------------------------------------------------------
# reading matrices


@pytest.mark.parametrize("kind", list(MATRIX_KINDS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64])
def test_read_modality_X_float32_equal_values(kind, dtype):
    M = counts(7, 5, dtype=dtype)
    adata = make_adata(MATRIX_KINDS[kind](M))
    before = adata.copy()
    d = read_modality("rna", adata, ModalitySetup())
    assert d.X.dtype == np.float32
    assert d.X.shape == (7, 5)
    assert d.n_obs == 7 and d.n_vars == 5
    if kind != "dense":
        assert sp.issparse(d.X) and d.X.format == "csr"
    np.testing.assert_array_equal(dense(d.X), M.astype(np.float32))
    assert list(d.obs_names) == list(adata.obs_names)
    assert list(d.var_names) == list(adata.var_names)
    assert_adata_unchanged(adata, before)


@pytest.mark.parametrize("kind", list(MATRIX_KINDS))
def test_read_modality_reads_layer(kind):
    raw = counts(6, 4, seed=1)
    other = counts(6, 4, seed=2) + 100
    adata = make_adata(MATRIX_KINDS[kind](other), layers={"counts": MATRIX_KINDS[kind](raw.copy())})
    before = adata.copy()
    d = read_modality("rna", adata, ModalitySetup(layer="counts"))
    assert d.X.dtype == np.float32
    np.testing.assert_array_equal(dense(d.X), raw.astype(np.float32))
    assert_adata_unchanged(adata, before)


@pytest.mark.parametrize("kind", list(MATRIX_KINDS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("layer", [None, "counts"])
def test_modality_data_does_not_share_memory_with_adata(kind, dtype, layer):
    M = MATRIX_KINDS[kind](counts(6, 5, dtype=dtype) + 1)  # no zeros: every entry is stored
    adata = make_adata(M.copy(), layers={"counts": M.copy()})
    before = adata.copy()
    d = read_modality("rna", adata, ModalitySetup(layer=layer))
    source = adata.X if layer is None else adata.layers[layer]
    for mine in matrix_buffers(d.X):
        for theirs in matrix_buffers(source):
            assert not np.shares_memory(mine, theirs)
    # writing into the private copy leaves the user's object alone
    if sp.issparse(d.X):
        d.X.data[:] = -7.0
    else:
        d.X[:] = -7.0
    assert_adata_unchanged(adata, before)


def test_read_modalities_leaves_adatas_unchanged():
    adatas, _ = make_synthetic_pair(n_cells=50, n_genes=12, n_proteins=6, seed=3)
    adatas["rna"].obs["batch"] = ["a", "b"] * 25
    adatas["rna"].layers["counts"] = adatas["rna"].X.copy()
    before = {k: copy.deepcopy(v) for k, v in adatas.items()}
    setups = {
        "rna": ModalitySetup(layer="counts", batch_key="batch", labels_key="cell_type"),
        "protein": ModalitySetup(labels_key="cell_type"),
    }
    data, cats = read_modalities(adatas, setups)
    for k in adatas:
        assert_adata_unchanged(adatas[k], before[k])
        assert data[k].X.dtype == np.float32
        np.testing.assert_array_equal(dense(data[k].X), dense(before[k].X))
        assert data[k].name == k
        assert data[k].setup == setups[k]
    assert cats == tuple(sorted(adatas["rna"].obs["cell_type"].unique()))


def test_obs_and_var_names_are_copies():
    adata = make_adata()
    d = read_modality("rna", adata, ModalitySetup())
    assert d.obs_names is not adata.obs_names
    assert d.var_names is not adata.var_names
    assert d.obs_names.equals(adata.obs_names) and d.var_names.equals(adata.var_names)


def test_normal_likelihood_accepts_negative_and_fractional_values():
    M = np.random.default_rng(0).normal(size=(5, 3))
    d = read_modality("prot", make_adata(M), ModalitySetup(likelihood="normal"))
    np.testing.assert_allclose(d.X, M.astype(np.float32))


def test_rows_returns_tensors():
    M = counts(8, 3)
    obs = pd.DataFrame({"b": list("xyxyxyxy")}, index=[f"c{i}" for i in range(8)])
    d = read_modality("rna", make_adata(sp.csr_matrix(M), obs=obs), ModalitySetup(batch_key="b"))
    idx = np.array([5, 0, 3])
    out = d.rows(idx)
    assert set(out) == {"x", "batch", "label"}
    assert out["x"].dtype == torch.float32 and out["x"].shape == (3, 3)
    assert out["batch"].dtype == torch.int64 and out["label"].dtype == torch.int64
    np.testing.assert_array_equal(out["x"].numpy(), M[idx].astype(np.float32))
    np.testing.assert_array_equal(out["batch"].numpy(), [1, 0, 1])
    np.testing.assert_array_equal(out["label"].numpy(), [UNLABELED] * 3)


# ---------------------------------------------------------------------------------------------
# validation errors


def test_missing_layer_lists_available_layers():
    adata = make_adata(layers={"counts": counts(), "spliced": counts()})
    with pytest.raises(DataError) as e:
        read_modality("rna", adata, ModalitySetup(layer="raw"))
    msg = str(e.value)
    assert "'rna'" in msg and "'raw'" in msg and "not found" in msg
    assert "counts" in msg and "spliced" in msg


def test_missing_layer_without_any_layers():
    with pytest.raises(DataError, match=r"modality 'rna'.*layer 'raw'.*none"):
        read_modality("rna", make_adata(), ModalitySetup(layer="raw"))


def test_missing_X():
    adata = ad.AnnData(
        obs=pd.DataFrame(index=["a", "b"]), var=pd.DataFrame(index=["f0", "f1", "f2"])
    )
    assert adata.X is None
    with pytest.raises(DataError, match=r"modality 'rna'.*X is empty"):
        read_modality("rna", adata, ModalitySetup())


def test_missing_batch_key_names_column():
    obs = pd.DataFrame({"sample": ["a"] * 6}, index=[f"c{i}" for i in range(6)])
    with pytest.raises(DataError) as e:
        read_modality("atac", make_adata(obs=obs), ModalitySetup(batch_key="donor"))
    msg = str(e.value)
    assert "'atac'" in msg and "batch_key" in msg and "'donor'" in msg and "sample" in msg


def test_batch_key_with_missing_values():
    obs = pd.DataFrame({"b": ["a", None, "b", "a", "b", "a"]}, index=[f"c{i}" for i in range(6)])
    with pytest.raises(DataError, match=r"modality 'rna'.*batch_key 'b'.*missing"):
        read_modality("rna", make_adata(obs=obs), ModalitySetup(batch_key="b"))


def test_missing_labels_key_names_column():
    adatas = {"rna": labelled_adata(["a", "b"]), "protein": labelled_adata(["a", "b"])}
    setups = {
        "rna": ModalitySetup(labels_key="ct"),
        "protein": ModalitySetup(labels_key="celltype"),
    }
    with pytest.raises(DataError) as e:
        read_modalities(adatas, setups)
    msg = str(e.value)
    assert "'protein'" in msg and "labels_key" in msg and "'celltype'" in msg


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kind", list(MATRIX_KINDS))
@pytest.mark.parametrize("likelihood", ["nb", "normal"])
def test_non_finite_values(bad, kind, likelihood):
    M = counts()
    M[2, 3] = bad
    with pytest.raises(DataError, match=r"modality 'rna'.*NaN or Inf"):
        read_modality(
            "rna", make_adata(MATRIX_KINDS[kind](M)), ModalitySetup(likelihood=likelihood)
        )


@pytest.mark.parametrize("kind", list(MATRIX_KINDS))
def test_negative_values_for_nb(kind):
    M = counts()
    M[1, 1] = -1.0
    with pytest.raises(DataError, match=r"modality 'rna'.*'nb'.*non-negative.*negative"):
        read_modality("rna", make_adata(MATRIX_KINDS[kind](M)), ModalitySetup(likelihood="nb"))


@pytest.mark.parametrize("kind", list(MATRIX_KINDS))
@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
def test_non_integer_values_for_count_likelihood(kind, likelihood):
    M = counts()
    M[0, 2] = 2.5
    with pytest.raises(DataError, match=rf"modality 'rna'.*'{likelihood}'.*integer"):
        read_modality(
            "rna", make_adata(MATRIX_KINDS[kind](M)), ModalitySetup(likelihood=likelihood)
        )


def test_unknown_likelihood():
    with pytest.raises(DataError, match="unknown likelihood 'poisson_typo'"):
        read_modality("rna", make_adata(), ModalitySetup(likelihood="poisson_typo"))


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)])
def test_empty_modality(shape):
    adata = ad.AnnData(
        np.zeros(shape, dtype=np.float32),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(shape[0])]),
        var=pd.DataFrame(index=[f"f{j}" for j in range(shape[1])]),
    )
    with pytest.raises(DataError, match=r"modality 'protein' is empty"):
        read_modality("protein", adata, ModalitySetup())


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_duplicated_obs_names():
    adata = make_adata(obs=pd.DataFrame(index=["a", "b", "a", "c", "d", "d"]))
    with pytest.raises(DataError) as e:
        read_modality("rna", adata, ModalitySetup())
    msg = str(e.value)
    assert "'rna'" in msg and "duplicated obs_names" in msg and "'a'" in msg and "'d'" in msg


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_duplicated_var_names():
    adata = ad.AnnData(counts(4, 3), var=pd.DataFrame(index=["g1", "g2", "g1"]))
    adata.obs_names = ["a", "b", "c", "d"]
    with pytest.raises(DataError) as e:
        read_modality("rna", adata, ModalitySetup())
    msg = str(e.value)
    assert "'rna'" in msg and "duplicated var_names" in msg and "'g1'" in msg


@pytest.mark.parametrize("names", [["rna"], ["rna", "protein", "atac"]])
def test_wrong_number_of_modalities(names):
    adatas = {n: make_adata(prefix=n) for n in names}
    setups = {n: ModalitySetup() for n in names}
    with pytest.raises(DataError, match=rf"exactly two modalities, got {len(names)}"):
        read_modalities(adatas, setups)


def test_zero_modalities():
    with pytest.raises(DataError, match="exactly two modalities, got 0"):
        read_modalities({}, {})


def test_setup_missing_for_a_modality():
    adatas = {"rna": make_adata(), "protein": make_adata()}
    with pytest.raises(DataError) as e:
        read_modalities(adatas, {"rna": ModalitySetup()})
    msg = str(e.value)
    assert "no setup" in msg and "protein" in msg and "'rna'" not in msg


def test_dataframe_instead_of_anndata():
    df = pd.DataFrame(counts(), index=[f"c{i}" for i in range(6)])
    with pytest.raises(TypeError, match=r"modality 'rna'.*AnnData.*DataFrame"):
        read_modality("rna", df, ModalitySetup())
    with pytest.raises(TypeError, match=r"modality 'protein'.*AnnData.*DataFrame"):
        read_modalities(
            {"rna": make_adata(), "protein": df},
            {"rna": ModalitySetup(), "protein": ModalitySetup()},
        )


def test_read_modalities_needs_a_mapping():
    with pytest.raises(TypeError, match="expected a dict"):
        read_modalities([make_adata(), make_adata()], {})


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------------------------------------
# labels


def read_labels(rna_labels, protein_labels, rna_setup=None, protein_setup=None):
    adatas = {
        "rna": labelled_adata(rna_labels, prefix="r"),
        "protein": labelled_adata(protein_labels, prefix="p"),
    }
    setups = {
        "rna": rna_setup or ModalitySetup(labels_key="ct"),
        "protein": protein_setup or ModalitySetup(labels_key="ct"),
    }
    return read_modalities(adatas, setups)


def test_labels_unlabelled_and_nan_get_minus_one_and_shared_sorted_categories():
    rna = ["T", "unknown", "B", np.nan, "T", "NK"]
    protein = pd.Categorical(["Mono", "B", "unknown", None, "T"])
    data, cats = read_labels(rna, protein)
    assert cats == ("B", "Mono", "NK", "T")
    assert "unknown" not in cats
    np.testing.assert_array_equal(data["rna"].labels, [3, -1, 0, -1, 3, 2])
    np.testing.assert_array_equal(data["protein"].labels, [1, 0, -1, -1, 3])
    for d in data.values():
        assert d.labels.dtype == np.int64


def test_custom_unlabeled_category():
    setup = ModalitySetup(labels_key="ct", unlabeled_category="?")
    data, cats = read_labels(["a", "?", "unknown"], ["b", "?", "a"], setup, setup)
    # "unknown" is an ordinary class when the unlabelled category is "?"
    assert cats == ("a", "b", "unknown")
    np.testing.assert_array_equal(data["rna"].labels, [0, -1, 2])
    np.testing.assert_array_equal(data["protein"].labels, [1, -1, 0])


def test_labels_only_in_one_modality():
    data, cats = read_labels(["x", "y", "unknown", "x"], ["x"] * 3, protein_setup=ModalitySetup())
    assert cats == ("x", "y")
    np.testing.assert_array_equal(data["rna"].labels, [0, 1, -1, 0])
    np.testing.assert_array_equal(data["protein"].labels, [UNLABELED] * 3)


def test_classes_present_in_only_one_modality():
    data, cats = read_labels(["c", "a"], ["b", "d", "b"])
    assert cats == ("a", "b", "c", "d")
    np.testing.assert_array_equal(data["rna"].labels, [2, 0])
    np.testing.assert_array_equal(data["protein"].labels, [1, 3, 1])


def test_numeric_labels_are_matched_as_strings():
    data, cats = read_labels([1, 2, 1], [2, 2, 3])
    assert cats == ("1", "2", "3")
    np.testing.assert_array_equal(data["rna"].labels, [0, 1, 0])
    np.testing.assert_array_equal(data["protein"].labels, [1, 1, 2])


def test_no_labels_gives_empty_categories():
    data, cats = read_labels(["a"], ["b"], ModalitySetup(), ModalitySetup())
    assert cats == ()
    for d in data.values():
        np.testing.assert_array_equal(d.labels, [UNLABELED])


@pytest.mark.parametrize("labels", [["unknown"] * 3, [np.nan] * 3, ["unknown", None, np.nan]])
def test_all_unlabelled_raises(labels):
    with pytest.raises(DataError) as e:
        read_labels(["a", "b"], labels)
    msg = str(e.value)
    assert "'protein'" in msg and "unlabelled" in msg and "'ct'" in msg


# ---------------------------------------------------------------------------------------------
# batches


def test_batch_codes_three_categories():
    values = [10, 2, 7, 2, 10, 7, 7]
    obs = pd.DataFrame({"donor": values}, index=[f"c{i}" for i in range(7)])
    d = read_modality("rna", make_adata(counts(7, 3), obs=obs), ModalitySetup(batch_key="donor"))
    assert d.batch.dtype == np.int64
    assert sorted(set(d.batch.tolist())) == [0, 1, 2]
    assert d.batch_categories == ["2", "7", "10"]
    assert all(isinstance(c, str) for c in d.batch_categories)
    assert [d.batch_categories[c] for c in d.batch] == [str(v) for v in values]


def test_batch_codes_string_categories():
    values = ["s3", "s1", "s2", "s1"]
    obs = pd.DataFrame({"b": values}, index=list("abcd"))
    d = read_modality("rna", make_adata(counts(4, 3), obs=obs), ModalitySetup(batch_key="b"))
    assert d.batch_categories == ["s1", "s2", "s3"]
    np.testing.assert_array_equal(d.batch, [2, 0, 1, 0])


def test_no_batch_key_single_batch():
    d = read_modality("rna", make_adata(), ModalitySetup())
    assert d.batch_categories == ["0"]
    assert d.batch.dtype == np.int64
    np.testing.assert_array_equal(d.batch, np.zeros(6))


# ---------------------------------------------------------------------------------------------
# splits


@pytest.mark.parametrize("n,fraction", [(1000, 0.1), (230, 0.1), (37, 0.25), (10, 0.0), (501, 0.2)])
def test_split_indices(n, fraction):
    train, val = split_indices(n, fraction, seed=0)
    assert len(val) == int(round(n * fraction))
    assert len(train) + len(val) == n
    assert len(np.intersect1d(train, val)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(n))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)


def test_split_indices_seeded():
    a = split_indices(500, 0.2, seed=1)
    b = split_indices(500, 0.2, seed=1)
    c = split_indices(500, 0.2, seed=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_split_indices_keeps_a_training_cell():
    train, val = split_indices(5, 1.0, seed=0)
    assert len(train) == 1 and len(val) == 4


def test_shared_order_ranks_a_name_alike_in_every_modality():
    names = {"a": pd.Index(list("pqrstuvw")), "b": pd.Index(list("wvutsrqp"))}
    order = shared_order(names, seed=4)
    for k in names:
        np.testing.assert_array_equal(np.sort(order[k]), np.arange(8))
    np.testing.assert_array_equal(names["a"][order["a"]], names["b"][order["b"]])
    # disjoint names: each order is its own random permutation, seeded
    disjoint = shared_order({"a": pd.Index(["x1", "x2", "x3"]), "b": pd.Index(["y1"])}, seed=4)
    np.testing.assert_array_equal(np.sort(disjoint["a"]), np.arange(3))
    assert not np.array_equal(order["a"], shared_order(names, seed=5)["a"])


def test_paired_cells_are_held_out_together_whatever_the_row_order():
    adatas, _ = make_synthetic_pair(n_cells=300, n_genes=20, n_proteins=8, seed=0)
    rng = np.random.default_rng(0)
    protein = adatas["protein"][rng.permutation(300)].copy()  # same cells, other row order
    data, _ = read_modalities(
        {"rna": adatas["rna"], "protein": protein},
        {"rna": ModalitySetup(), "protein": ModalitySetup()},
    )
    dm = PairedDataModule(data, val_fraction=0.2, seed=1)
    held = {k: set(data[k].obs_names[dm.val_idx[k]]) for k in data}
    assert len(held["rna"]) == 60 and held["rna"] == held["protein"]

    # protein measured on a subset of the cells: most of its held-out cells are the RNA's
    data, _ = read_modalities(
        {"rna": adatas["rna"], "protein": protein[:150].copy()},
        {"rna": ModalitySetup(), "protein": ModalitySetup()},
    )
    dm = PairedDataModule(data, val_fraction=0.2, seed=1)
    held = {k: set(data[k].obs_names[dm.val_idx[k]]) for k in data}
    assert len(held["protein"]) == 30 and len(held["protein"] & held["rna"]) >= 20


# ---------------------------------------------------------------------------------------------
# PairedSampler


def collect(sampler):
    return list(iter(sampler))


def test_paired_sampler_unequal_sizes():
    n_big, n_small, bs = 1000, 230, 64
    big = np.arange(n_big) + 5000  # indices are arbitrary ids, not positions
    small = np.arange(n_small) * 3
    sampler = PairedSampler({"rna": big, "protein": small}, batch_size=bs, seed=0)
    assert len(sampler) == math.ceil(n_big / bs)
    batches = collect(sampler)
    assert len(batches) == len(sampler)
    for b in batches:
        assert list(b) == ["rna", "protein"]
        assert len(b["protein"]) == min(len(b["rna"]), n_small)
    sizes = [len(b["rna"]) for b in batches]
    assert sizes == [bs] * (n_big // bs) + [n_big % bs]

    # larger modality: each index exactly once per epoch, in shuffled order
    lead = np.concatenate([b["rna"] for b in batches])
    np.testing.assert_array_equal(np.sort(lead), big)
    assert not np.array_equal(lead, big)

    # smaller modality: successive permutations, every cell before any repeat
    stream = np.concatenate([b["protein"] for b in batches])
    assert len(stream) == n_big
    assert np.isin(stream, small).all()
    windows = [stream[s : s + n_small] for s in range(0, len(stream) - n_small + 1, n_small)]
    assert len(windows) == n_big // n_small
    for w in windows:
        np.testing.assert_array_equal(np.sort(w), small)
    tail = stream[len(windows) * n_small :]
    assert len(np.unique(tail)) == len(tail)
    # each pass is reshuffled: no two passes in the same order
    for i in range(len(windows)):
        for j in range(i + 1, len(windows)):
            assert not np.array_equal(windows[i], windows[j])
    # and the order is shuffled, not the natural one
    assert not np.array_equal(windows[0], small)


def test_paired_sampler_lead_is_larger_regardless_of_key_order():
    sampler = PairedSampler({"a": np.arange(10), "b": np.arange(100)}, batch_size=16)
    assert sampler.lead == "b"
    assert len(sampler) == math.ceil(100 / 16)
    batches = collect(sampler)
    assert all(list(b) == ["a", "b"] for b in batches)
    assert all(len(b["a"]) == 10 for b in batches[:-1])
    assert len(batches[-1]["a"]) == min(10, 100 % 16)


def test_paired_sampler_set_epoch():
    idx = {"rna": np.arange(300), "protein": np.arange(70)}
    s = PairedSampler(idx, batch_size=32, seed=4)
    s.set_epoch(0)
    e0 = collect(s)
    s.set_epoch(1)
    e1 = collect(s)
    s.set_epoch(0)
    e0_again = collect(s)
    for k in idx:
        a = np.concatenate([b[k] for b in e0])
        assert not np.array_equal(a, np.concatenate([b[k] for b in e1]))
        np.testing.assert_array_equal(a, np.concatenate([b[k] for b in e0_again]))
    # iterating twice without set_epoch repeats the epoch
    for b0, b1 in zip(e0, collect(s), strict=True):
        for k in idx:
            np.testing.assert_array_equal(b0[k], b1[k])
    # a fresh sampler with the same seed reproduces; another seed differs
    same = collect(PairedSampler(idx, batch_size=32, seed=4))
    other = collect(PairedSampler(idx, batch_size=32, seed=5))
    np.testing.assert_array_equal(same[0]["rna"], e0[0]["rna"])
    assert not np.array_equal(other[0]["rna"], e0[0]["rna"])


def test_paired_sampler_no_shuffle_natural_order_cycled():
    big, small = np.arange(100) + 1000, np.arange(30) + 7
    s = PairedSampler({"rna": big, "protein": small}, batch_size=16, shuffle=False)
    batches = collect(s)
    s.set_epoch(3)
    assert all(
        np.array_equal(a[k], b[k])
        for a, b in zip(batches, collect(s), strict=True)
        for k in ("rna", "protein")
    )
    np.testing.assert_array_equal(np.concatenate([b["rna"] for b in batches]), big)
    stream = np.concatenate([b["protein"] for b in batches])
    np.testing.assert_array_equal(stream, np.resize(small, len(stream)))
    assert len(stream) == 100


def test_paired_sampler_smaller_than_batch_size():
    n_big, n_small, bs = 500, 40, 64
    small = np.arange(n_small) + 100
    s = PairedSampler({"rna": np.arange(n_big), "protein": small}, batch_size=bs, seed=1)
    batches = collect(s)
    assert len(batches) == math.ceil(n_big / bs)
    orders = []
    for b in batches:
        p = b["protein"]
        assert len(p) == min(len(b["rna"]), n_small)
        assert len(np.unique(p)) == len(p)
        assert np.isin(p, small).all()
        if len(p) == n_small:
            np.testing.assert_array_equal(np.sort(p), small)
            orders.append(p)
    assert len(orders) >= 2
    assert any(not np.array_equal(orders[0], o) for o in orders[1:])


def test_paired_sampler_equal_sizes():
    s = PairedSampler({"rna": np.arange(100), "protein": np.arange(100)}, batch_size=25)
    batches = collect(s)
    assert len(batches) == 4
    for k in ("rna", "protein"):
        np.testing.assert_array_equal(
            np.sort(np.concatenate([b[k] for b in batches])), np.arange(100)
        )


# ---------------------------------------------------------------------------------------------
# loaders and data module


@pytest.fixture(scope="module")
def unequal_data():
    adatas, _ = make_synthetic_pair(n_cells=1000, n_genes=20, n_proteins=8, seed=0)
    rna = adatas["rna"]
    rna.obs["batch"] = pd.Categorical(np.array(["s1", "s2", "s3"])[np.arange(1000) % 3])
    protein = adatas["protein"][:230].copy()
    protein.obs["cell_type"] = protein.obs["cell_type"].astype(object)
    protein.obs.loc[protein.obs_names[::5], "cell_type"] = "unknown"
    setups = {
        "rna": ModalitySetup(batch_key="batch", labels_key="cell_type"),
        "protein": ModalitySetup(labels_key="cell_type"),
    }
    data, cats = read_modalities({"rna": rna, "protein": protein}, setups)
    return data, cats


def check_batch(batch, data, bs, sizes):
    """Shapes and dtypes of a paired minibatch; ``sizes``: cells each modality samples from."""
    assert set(batch) == {"rna", "protein"}
    n_lead = batch["rna"]["x"].shape[0]
    assert 0 < n_lead <= bs
    for name, part in batch.items():
        assert set(part) == {"x", "batch", "label"}
        n = part["x"].shape[0]
        assert n == min(n_lead, sizes[name])
        assert part["x"].shape == (n, data[name].n_vars)
        assert part["x"].dtype == torch.float32
        assert part["batch"].shape == (n,) and part["batch"].dtype == torch.int64
        assert part["label"].shape == (n,) and part["label"].dtype == torch.int64


def find_rows(X, rows):
    """Positions of each row of ``rows`` in ``X`` (rows of X must be unique)."""
    keys = {r.tobytes(): i for i, r in enumerate(np.ascontiguousarray(dense(X)))}
    return np.array([keys[r.tobytes()] for r in np.ascontiguousarray(rows)])


def test_paired_loader_train_batches(unequal_data):
    data, cats = unequal_data
    assert cats == ("type_0", "type_1", "type_2", "type_3")
    bs = 64
    idx = {k: np.arange(d.n_obs) for k, d in data.items()}
    loader = paired_loader(data, idx, batch_size=bs, shuffle=True, seed=0)
    assert isinstance(loader.sampler, PairedSampler)
    batches = list(loader)
    assert len(batches) == len(loader) == math.ceil(1000 / bs)
    for b in batches:
        check_batch(b, data, bs, {k: len(v) for k, v in idx.items()})
        assert b["rna"]["batch"].min() >= 0 and b["rna"]["batch"].max() <= 2
        assert (b["protein"]["batch"] == 0).all()
        assert b["rna"]["label"].min() >= 0  # every RNA cell is labelled
    labels = torch.cat([b["protein"]["label"] for b in batches])
    assert (labels == UNLABELED).any() and labels.max() < len(cats)
    # the RNA rows of an epoch are all RNA cells, each once, with their own batch and label
    x = torch.cat([b["rna"]["x"] for b in batches]).numpy()
    pos = find_rows(data["rna"].X, x)
    np.testing.assert_array_equal(np.sort(pos), np.arange(1000))
    np.testing.assert_array_equal(
        torch.cat([b["rna"]["batch"] for b in batches]).numpy(), data["rna"].batch[pos]
    )
    np.testing.assert_array_equal(
        torch.cat([b["rna"]["label"] for b in batches]).numpy(), data["rna"].labels[pos]
    )


def test_data_module_split_and_loaders(unequal_data):
    data, _ = unequal_data
    bs = 32
    dm = PairedDataModule(data, batch_size=bs, seed=3)
    for k, d in data.items():
        train, val = dm.train_idx[k], dm.val_idx[k]
        assert len(val) == round(0.1 * d.n_obs)
        assert len(np.intersect1d(train, val)) == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(d.n_obs))
    assert len(dm.val_idx["rna"]) == 100 and len(dm.val_idx["protein"]) == 23

    train = list(dm.train_dataloader())
    assert len(train) == math.ceil(900 / bs)
    for b in train:
        check_batch(b, data, bs, {k: len(v) for k, v in dm.train_idx.items()})
    rna_pos = find_rows(data["rna"].X, torch.cat([b["rna"]["x"] for b in train]).numpy())
    np.testing.assert_array_equal(np.sort(rna_pos), dm.train_idx["rna"])
    prot_pos = find_rows(data["protein"].X, torch.cat([b["protein"]["x"] for b in train]).numpy())
    assert np.isin(prot_pos, dm.train_idx["protein"]).all()

    val_loader = dm.val_dataloader()
    assert not val_loader.sampler.shuffle
    val = list(val_loader)
    assert len(val) == math.ceil(100 / bs)
    for b in val:
        check_batch(b, data, bs, {k: len(v) for k, v in dm.val_idx.items()})
    # the validation loader pairs both modalities with validation cells only, in natural order
    for name in ("rna", "protein"):
        d = data[name]
        n_seen = sum(b[name]["x"].shape[0] for b in val)
        expected = np.resize(dm.val_idx[name], n_seen)
        x = torch.cat([b[name]["x"] for b in val]).numpy()
        np.testing.assert_array_equal(x, dense(d.X[expected]))
        np.testing.assert_array_equal(
            torch.cat([b[name]["batch"] for b in val]).numpy(), d.batch[expected]
        )
        np.testing.assert_array_equal(
            torch.cat([b[name]["label"] for b in val]).numpy(), d.labels[expected]
        )
    assert sum(b["rna"]["x"].shape[0] for b in val) == 100
    # the validation order is the same every time
    again = list(dm.val_dataloader())
    for a, b in zip(val, again, strict=True):
        assert torch.equal(a["protein"]["x"], b["protein"]["x"])


def test_small_sparse_matrices_are_gathered_from_dense_copies(unequal_data, monkeypatch):
    data, _ = unequal_data
    sparse = {k: dataclasses.replace(d, X=sp.csr_matrix(d.X)) for k, d in data.items()}
    copies = with_dense_rows(sparse)
    for k, d in sparse.items():
        assert isinstance(copies[k].X, np.ndarray) and sp.issparse(d.X)  # the input is kept
        np.testing.assert_array_equal(copies[k].X, d.X.toarray())
        assert copies[k].obs_names is d.obs_names and copies[k].batch is d.batch
    # the same minibatches either way
    from_sparse = list(paired_loader(sparse, PairedDataModule(sparse).train_idx, 256, True, seed=0))
    from_dense = list(PairedDataModule(sparse).train_dataloader())
    for a, b in zip(from_sparse, from_dense, strict=True):
        for name in a:
            for key in ("x", "batch", "label"):
                assert torch.equal(a[name][key], b[name][key])
    # above the budget the sparse matrix is shared as it is
    monkeypatch.setattr("diagvi.data.DENSE_COPY_BYTES", 100)
    assert all(with_dense_rows(sparse)[k] is d for k, d in sparse.items())


def test_data_module_seeded_split(unequal_data):
    data, _ = unequal_data
    a, b, c = (PairedDataModule(data, seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a.val_idx["rna"], b.val_idx["rna"])
    assert not np.array_equal(a.val_idx["rna"], c.val_idx["rna"])


def test_data_module_custom_fraction_and_no_validation(unequal_data):
    data, _ = unequal_data
    dm = PairedDataModule(data, val_fraction=0.25)
    assert len(dm.val_idx["rna"]) == 250 and len(dm.val_idx["protein"]) == round(0.25 * 230)
    none = PairedDataModule(data, val_fraction=0.0)
    assert all(len(v) == 0 for v in none.val_idx.values())
    assert none.val_dataloader() == []
    assert len(list(none.train_dataloader())) == math.ceil(1000 / 256)


def test_train_loader_order_follows_set_epoch(unequal_data):
    data, _ = unequal_data
    dm = PairedDataModule(data, batch_size=128)
    loader = dm.train_dataloader()
    first = [b["protein"]["x"] for b in loader]
    loader.sampler.set_epoch(1)
    second = [b["protein"]["x"] for b in loader]
    loader.sampler.set_epoch(0)
    third = [b["protein"]["x"] for b in loader]
    assert not torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first, third, strict=True))


@pytest.mark.parametrize("n_lead,batch_size,replicas", [(1000, 64, 2), (1024, 64, 2), (700, 50, 3)])
def test_sampler_shards_the_epoch_across_ranks(n_lead, batch_size, replicas):
    indices = {"rna": np.arange(n_lead), "protein": np.arange(300)}
    shards = [
        list(PairedSampler(indices, batch_size, True, 0, replicas, rank))
        for rank in range(replicas)
    ]
    lengths = {len(s) for s in shards}
    assert lengths == {len(PairedSampler(indices, batch_size, True, 0, replicas, 0))}
    seen = [np.concatenate([b["rna"] for b in s]) for s in shards]
    assert set(np.concatenate(seen)) == set(range(n_lead))  # the epoch is covered
    n_global = -(-n_lead // batch_size)
    pads = replicas * lengths.pop() - n_global
    overlap = sum(len(set(a) & set(b)) for i, a in enumerate(seen) for b in seen[i + 1 :])
    assert overlap <= pads * batch_size  # disjoint apart from the padding minibatches
    if pads == 0:
        assert overlap == 0


def test_sampler_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank"):
        PairedSampler({"rna": np.arange(10)}, 4, num_replicas=2, rank=2)
