"""Audit of diagvi.stream's reader and writer: results on disk are replaced, never rewritten in
place or left half-written; a matrix opened by a relative path keeps reading that file, and a
CSR matrix whose attributes are fixed-length strings is read as CSR."""

from __future__ import annotations

import gc
import pickle

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from diagvi.stream import BackedMatrix, NpyWriter


def write_result(path, values: np.ndarray) -> np.ndarray:
    writer = NpyWriter(path, len(values))
    for start in range(0, len(values), 2):
        writer.write(values[start : start + 2])
    return writer.result()


def test_npy_writer_leaves_an_earlier_result_unchanged(tmp_path):
    """get_latent_representation(out_dir=d) twice: the first memmap kept its values (it changed
    to the second result's when the file was truncated and rewritten in place)."""
    first = write_result(tmp_path / "latent.npy", np.zeros((5, 3), np.float32))
    second = write_result(tmp_path / "latent.npy", np.ones((5, 3), np.float32))
    np.testing.assert_array_equal(second, np.ones((5, 3)))
    np.testing.assert_array_equal(first, np.zeros((5, 3)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latent.npy"]


def test_npy_writer_leaves_no_partial_file(tmp_path):
    """A write that stops midway leaves the earlier file as it was and no temporary file (it
    left a truncated .npy whose header promised every row, over the earlier result)."""
    target = tmp_path / "imputed.npy"
    np.save(target, np.full((4, 2), 7.0, np.float32))
    short = NpyWriter(target, 4)
    short.write(np.ones((2, 2), np.float32))
    with pytest.raises(RuntimeError, match="wrote 2 rows of 4"):
        short.result()
    np.testing.assert_array_equal(np.load(target), np.full((4, 2), 7.0))
    abandoned = NpyWriter(target, 4)  # an inference that raised between two minibatches
    abandoned.write(np.ones((3, 2), np.float32))
    del abandoned
    gc.collect()
    np.testing.assert_array_equal(np.load(target), np.full((4, 2), 7.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imputed.npy"]


def test_backed_matrix_opened_by_relative_path_keeps_its_file(tmp_path, monkeypatch):
    """Two folders with an rna.h5ad each: a matrix opened in the first reads the first file
    after a chdir (a view or a worker's pickled copy reopened the second one)."""
    values = {}
    for k, name in enumerate(("a", "b")):
        (tmp_path / name).mkdir()
        values[name] = np.full((6, 3), k + 1, np.float32)
        ad.AnnData(sp.csr_matrix(values[name])).write_h5ad(tmp_path / name / "rna.h5ad")
    monkeypatch.chdir(tmp_path / "a")
    X = BackedMatrix("rna.h5ad", chunk_rows=2)
    monkeypatch.chdir(tmp_path / "b")
    np.testing.assert_array_equal(X[np.arange(3)].read(np.arange(3)), values["a"][:3])
    worker = pickle.loads(pickle.dumps(X))
    np.testing.assert_array_equal(worker.read(np.arange(6)), values["a"])


def test_csr_with_fixed_length_string_attributes_is_read(tmp_path):
    """An .h5ad whose encoding attributes are fixed-length strings (as Julia's HDF5.jl writes
    them; anndata reads it as CSR) was refused as "stored as b'csr_matrix'"."""
    x = np.random.default_rng(0).poisson(1.0, size=(9, 4)).astype(np.float32)
    path = tmp_path / "julia.h5ad"
    ad.AnnData(sp.csr_matrix(x)).write_h5ad(path)
    with h5py.File(path, "a") as f:
        for name in ("encoding-type", "encoding-version"):
            value = f["X"].attrs[name]
            del f["X"].attrs[name]
            f["X"].attrs[name] = np.bytes_(value)
    assert isinstance(ad.read_h5ad(path, backed="r").X, ad.abc.CSRDataset)
    X = BackedMatrix(path, chunk_rows=4)
    assert X.is_sparse and X.shape == (9, 4)
    np.testing.assert_array_equal(X.read(np.arange(9)), x)
