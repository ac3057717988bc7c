"""Audit of the data layer: numeric labels across modalities and reloads, error messages that
name the modality, atomic writes' permissions and the saved guidance graph."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from diagvi.data import UNLABELED, ModalitySetup, read_modalities
from diagvi.errors import DataError
from diagvi.graph import graph_from_shared_names, validate_graph
from diagvi.io import atomic_write, graph_from_dict, graph_to_dict
from diagvi.synthetic import _append_csr, _csr_group


def labelled(labels, prefix: str) -> ad.AnnData:
    n = len(labels)
    X = np.random.default_rng(0).poisson(2.0, (n, 3)).astype(np.float32) + 1
    obs = pd.DataFrame({"ct": labels}, index=[f"{prefix}{i}" for i in range(n)])
    return ad.AnnData(X, obs=obs, var=pd.DataFrame(index=["f0", "f1", "f2"]))


def read(rna, protein, setup=None, **saved):
    setup = setup or ModalitySetup(labels_key="ct")
    adatas = {"rna": labelled(rna, "r"), "protein": labelled(protein, "p")}
    return read_modalities(adatas, {"rna": setup, "protein": setup}, **saved)


# ---------------------------------------------------------------------------------------------
# numeric labels: an integer column with a missing value is float in pandas


def test_integer_and_float_labels_name_one_class():
    # cluster ids; the protein column holds a NaN (unlabelled cell), so pandas made it float
    data, cats = read([0, 1, 2, 0], [2.0, np.nan, 0.0, 1.0])
    assert cats == ("0", "1", "2")  # was ("0", "0.0", "1", "1.0", "2", "2.0")
    np.testing.assert_array_equal(data["rna"].labels, [0, 1, 2, 0])
    np.testing.assert_array_equal(data["protein"].labels, [2, UNLABELED, 0, 1])


def test_numeric_unlabeled_category_matches_a_float_column():
    setup = ModalitySetup(labels_key="ct", unlabeled_category="-1")
    data, cats = read([0, -1, 1], [-1.0, np.nan, 1.0, 0.0], setup)
    assert cats == ("0", "1")  # -1.0 was a class
    np.testing.assert_array_equal(data["protein"].labels, [UNLABELED, UNLABELED, 1, 0])
    # the unlabelled value as pandas wrote it still works
    setup = ModalitySetup(labels_key="ct", unlabeled_category="-1.0")
    data, cats = read([0, 1, 1], [-1.0, np.nan, 1.0], setup)
    assert cats == ("0", "1")
    np.testing.assert_array_equal(data["protein"].labels, [UNLABELED, UNLABELED, 1])


def test_saved_model_matches_numeric_labels_by_value():
    batches = {"rna": ["0"], "protein": ["0"]}
    # trained on an integer column; the new cells' column is float (some cells unlabelled)
    data, cats = read(
        [1.0, np.nan, 0.0], [np.nan] * 2, categories=("0", "1"), batch_categories=batches
    )
    assert cats == ("0", "1")
    np.testing.assert_array_equal(data["rna"].labels, [1, UNLABELED, 0])
    np.testing.assert_array_equal(data["protein"].labels, [UNLABELED] * 2)
    # a model saved when float labels were named "1.0" still reads them
    data, cats = read([1.0, 2.0], [2, 1], categories=("1.0", "2.0"), batch_categories=batches)
    assert cats == ("1.0", "2.0")
    np.testing.assert_array_equal(data["rna"].labels, [0, 1])
    np.testing.assert_array_equal(data["protein"].labels, [1, 0])


def test_string_labels_are_unchanged():
    data, cats = read(["T", "1.0", "unknown", None], pd.Categorical(["B", "T", np.nan]))
    assert cats == ("1.0", "B", "T")  # a string stays as written
    np.testing.assert_array_equal(data["rna"].labels, [2, 0, UNLABELED, UNLABELED])
    np.testing.assert_array_equal(data["protein"].labels, [1, 2, UNLABELED])


def test_unknown_label_on_reload_names_the_modality_and_column():
    with pytest.raises(DataError) as e:
        read(
            ["a", "b"],
            ["a", "z"],
            categories=("a", "b"),
            batch_categories={"rna": ["0"], "protein": ["0"]},
        )
    msg = str(e.value)
    assert "'protein'" in msg and "'ct'" in msg and "['z']" in msg


# ---------------------------------------------------------------------------------------------
# io


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_gives_the_permissions_of_a_plain_write(tmp_path):
    umask = os.umask(0o022)
    try:
        target = tmp_path / "model.pt"
        atomic_write(target, lambda f: Path(f).write_text("one"))
        assert mode(target) == 0o644  # was 0o600 (mkstemp's), whatever the umask
        os.chmod(target, 0o640)  # a plain write keeps the replaced file's permissions
        atomic_write(target, lambda f: Path(f).write_text("two"))
        assert mode(target) == 0o640 and target.read_text() == "two"
    finally:
        os.umask(umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_atomic_write_failure_leaves_the_old_file(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("old")

    def fail(f):
        Path(f).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def edges(graph) -> set:
    ei, w, s = graph.edge_index.numpy(), graph.edge_weight.numpy(), graph.edge_sign.numpy()
    return set(zip(ei[0].tolist(), ei[1].tolist(), w.tolist(), s.tolist(), strict=True))


def test_graph_from_dict_keeps_the_modality_order():
    rna, protein = pd.Index(["a", "b", "c"]), pd.Index(["c", "x"])
    graph = graph_from_shared_names({"rna": rna, "protein": protein})
    restored = graph_from_dict(graph_to_dict(graph))
    assert restored.modalities == ("rna", "protein")
    assert restored.node_ranges == {"rna": (0, 3), "protein": (3, 5)}
    # the same graph used with the modalities in the other order is renumbered
    swapped = {"protein": protein, "rna": rna}
    expected = graph_from_shared_names(swapped)
    assert edges(validate_graph(restored, swapped)) == edges(expected)


# ---------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_csr_offsets_pass_two_to_the_31():
    big = 2**31 - 1  # values already written before this block (rows of earlier chunks)
    with h5py.File("pair.h5", "w", driver="core", backing_store=False) as f:
        group = _csr_group(f, (3, 4))
        group["indptr"][1] = big
        _append_csr(group, 1, sp.csr_matrix(np.arange(1, 9, dtype=np.float32).reshape(2, 4)))
        # the block's int32 offsets plus `big` wrapped to negative numbers
        assert group["indptr"][:].tolist() == [0, big, big + 4, big + 8]
        assert group["data"].shape == (big + 8,)
        assert group["data"][big:].tolist() == list(range(1, 9))
