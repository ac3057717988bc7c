"""Audit of the input checks (diagvi.checks) and the checkpoint IO (diagvi.checkpoint).

The checks must judge the data the user's AnnData holds (a backed AnnData's layers are in
memory), say what they did, and give the same verdict and example entry in memory and on disk;
the checkpoint IO must refuse what Lightning's refuses.
"""

from __future__ import annotations

import tracemalloc
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import diagvi.stream as stream
from diagvi import DataError
from diagvi.checkpoint import AtomicCheckpointIO
from diagvi.checks import _matrix
from diagvi.data import ModalitySetup, read_modalities, read_modality
from diagvi.stream import BackedMatrix


def make_adata(X, prefix: str) -> ad.AnnData:
    n_obs, n_vars = X.shape
    return ad.AnnData(
        X,
        obs=pd.DataFrame(index=[f"{prefix}{i}" for i in range(n_obs)]),
        var=pd.DataFrame(index=[f"{prefix}_f{j}" for j in range(n_vars)]),
    )


def counts(n_obs: int = 10, n_vars: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(2.0, (n_obs, n_vars)).astype(np.float64) + 1


def dense(X) -> np.ndarray:
    if isinstance(X, BackedMatrix):
        return X.read(np.arange(X.shape[0]))
    return X.toarray() if sp.issparse(X) else np.asarray(X)


# ---------------------------------------------------------------------------------------------
# a backed AnnData's layers live in memory


@pytest.mark.parametrize("kind", [np.asarray, sp.csr_matrix])
def test_backed_anndata_layer_is_read_from_memory(tmp_path, kind):
    # anndata reads the layers of a backed AnnData into memory; a layer replaced or added
    # there must be the one checked and trained on, not the file's stale copy (or none)
    x = counts()
    adata = make_adata(kind(x), "r")
    adata.layers["counts"] = kind(x)
    adata.write_h5ad(tmp_path / "r.h5ad")
    backed = ad.read_h5ad(tmp_path / "r.h5ad", backed="r")
    spoilt = x.copy()
    spoilt[7, 2] = 2.5
    backed.layers["counts"] = kind(spoilt)
    with pytest.raises(DataError, match=r"layer 'counts' has 1 non-integer.*2\.5 at cell 'r7'"):
        read_modality("rna", backed, ModalitySetup(layer="counts"))
    added = x.copy()
    added[0, 0] = 40
    backed.layers["added"] = kind(added)
    d = read_modality("rna", backed, ModalitySetup(layer="added"))
    np.testing.assert_array_equal(dense(d.X), added.astype(np.float32))
    assert isinstance(read_modality("rna", backed, ModalitySetup()).X, BackedMatrix)  # X: disk


# ---------------------------------------------------------------------------------------------
# empty="drop" with all-zero features only


def test_empty_drop_with_only_all_zero_features_does_not_claim_cells_were_dropped():
    x = counts()
    x[:, 1] = 0
    adatas = {"rna": make_adata(x, "r"), "protein": make_adata(counts(8, 3, 1), "p")}
    setups = {"rna": ModalitySetup(empty="drop"), "protein": ModalitySetup()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data, _ = read_modalities(adatas, setups)
    assert data["rna"].n_obs == 10
    [message] = [str(w.message) for w in caught if "all-zero" in str(w.message)]
    assert "1 all-zero feature(s) (e.g. ['r_f1'])" in message, message
    assert "dropped" not in message and "fewer rows" not in message, message
    assert "kept them" in message, message


# ---------------------------------------------------------------------------------------------
# in memory and on disk: the same verdict and the same cell named


def split_entry(m: sp.csr_matrix, i: int, j: int) -> sp.csr_matrix:
    """``m`` with its stored value at (i, j) split into two halves: a non-canonical CSR."""
    k = m.indptr[i] + np.flatnonzero(m.indices[m.indptr[i] : m.indptr[i + 1]] == j)[0]
    data = np.insert(m.data, k, m.data[k] / 2)
    data[k + 1] /= 2
    indptr = m.indptr.copy()
    indptr[i + 1 :] += 1
    return sp.csr_matrix((data, np.insert(m.indices, k, j), indptr), shape=m.shape)


@pytest.mark.parametrize("kind", ["dense", "csr"])
@pytest.mark.parametrize(
    ("cell", "feature", "value", "found"),
    [(9, 3, -3.0, "1 negative value(s) (e.g. -3"), (8, 1, 1.5, "1 non-integer value(s) (e.g. 1.5")],
)
def test_backed_and_in_memory_checks_name_the_same_entry(
    tmp_path, monkeypatch, kind, cell, feature, value, found
):
    x = counts(11, 4)
    x[5, :] = 0  # an empty row before the bad entry shifts the CSR offsets
    x[cell, feature] = value
    # CSR: the bad value stored as two halves, summed as scipy does
    X = split_entry(sp.csr_matrix(x), cell, feature) if kind == "csr" else x
    memory = make_adata(X, "r")
    memory.write_h5ad(tmp_path / "r.h5ad")
    monkeypatch.setattr(stream, "CHUNK_ROWS", 3)  # the bad entry in the third or fourth chunk
    backed = ad.read_h5ad(tmp_path / "r.h5ad", backed="r")
    messages = []
    for adata in (memory, backed):
        with pytest.raises(DataError) as err:
            read_modality("rna", adata, ModalitySetup(likelihood="nb"))
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert f"{found} at cell 'r{cell}', feature 'r_f{feature}')" in messages[0], messages[0]


# ---------------------------------------------------------------------------------------------
# checkpoint IO


def test_atomic_checkpoint_io_refuses_storage_options_like_lightning(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "a.ckpt"
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({"state_dict": {"w": torch.ones(1)}}, path, storage_options={"k": 1})
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left
    io.save_checkpoint({"state_dict": {"w": torch.ones(1)}, "epoch": 2}, path)
    assert io.load_checkpoint(path)["epoch"] == 2


def test_sparse_input_is_copied_to_float32_once():
    """A float64 CSR X becomes one private float32 CSR copy, without a second full copy at
    the peak (csr_matrix(X, dtype, copy=True) held twice the result's memory)."""
    X = sp.random(4000, 500, density=0.1, format="csr", dtype=np.float64, random_state=0)
    adata = ad.AnnData(X)
    tracemalloc.start()
    copy, _ = _matrix("rna", adata, None)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    result = copy.data.nbytes + copy.indices.nbytes + copy.indptr.nbytes
    assert isinstance(copy, sp.csr_matrix) and copy.dtype == np.float32
    assert peak < 1.3 * result
    assert not np.shares_memory(copy.data, adata.X.data)
    assert (copy != X.astype(np.float32)).nnz == 0
