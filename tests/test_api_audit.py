"""Audit of the DIAGVI user API: imputation batches, kNN imputation, argument errors.

Untrained tiny models: the decoder's per-batch parameters are set by hand where batches must
decode differently, so nothing here trains.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest
import torch

from diagvi import DIAGVI, DataError, inference
from diagvi.data import ModalityData, ModalitySetup
from diagvi.synthetic import make_synthetic_pair


def tiny_model(donors: pd.Categorical | np.ndarray | None = None) -> tuple[DIAGVI, dict]:
    """A 40-cell untrained model; the protein's batch key is ``donor`` when given, and its
    batches decode differently (random per-batch decoder biases)."""
    adatas, mapping = make_synthetic_pair(n_cells=40, n_genes=12, n_proteins=5)
    protein = adatas["protein"]
    if donors is not None:
        protein.obs["donor"] = donors
    DIAGVI.setup_anndata(adatas["rna"])
    DIAGVI.setup_anndata(protein, batch_key=None if donors is None else "donor")
    model = DIAGVI(adatas, mapping_df=mapping, n_latent=3, n_hidden=8)
    beta = model.module.z2x["protein"].beta
    with torch.no_grad():
        beta.add_(torch.randn(beta.shape, generator=torch.Generator().manual_seed(0)))
    return model, adatas


# ----------------------------------------------------------------------------- target batch


@pytest.mark.parametrize(
    ("donors", "first", "other"),
    [
        (np.where(np.arange(40) % 2, 2, 1), "1", "2"),  # no batch is named "0"
        (pd.Categorical(np.where(np.arange(40) % 2, 0, 5), categories=[5, 0]), "5", "0"),
    ],
)
def test_default_target_batch_is_the_first_with_integer_batch_names(donors, first, other):
    """``target_batch=None`` is the first batch, not the batch named ``0`` (which may be
    missing, or another batch)."""
    model, _ = tiny_model(donors)
    assert model.data["protein"].batch_categories == [first, other]
    default = model.get_imputed_values("rna", target_libsize=100.0)
    np.testing.assert_array_equal(
        default, model.get_imputed_values("rna", target_batch=first, target_libsize=100.0)
    )
    assert not np.allclose(
        default, model.get_imputed_values("rna", target_batch=other, target_libsize=100.0)
    )
    knn = model.get_imputed_values("rna", method="knn", target_libsize=100.0, n_neighbors=3)
    assert knn.shape == (40, 5) and np.isfinite(knn).all()


def test_numbers_name_batches_of_a_float_column():
    """Donors ``1.0`` and ``2.0`` (a float column): ``target_batch=1`` is donor ``1.0``, not
    the second batch; a number that names no batch is refused, not read as an index."""
    model, _ = tiny_model(np.where(np.arange(40) % 2, 2.0, 1.0))
    assert model.data["protein"].batch_categories == ["1.0", "2.0"]
    first = model.get_imputed_values("rna", target_batch="1.0", target_libsize=100.0)
    for value in (1, np.int64(1), 1.0):
        np.testing.assert_array_equal(
            first, model.get_imputed_values("rna", target_batch=value, target_libsize=100.0)
        )
    with pytest.raises(DataError, match="numeric batch names are read as names"):
        model.get_imputed_values("rna", target_batch=0)


def test_knn_imputation_in_a_batch_without_cells_raises(tmp_path):
    """A saved model loaded on some of its batches: kNN imputation into a batch with no cells
    is refused by name instead of returning NaN."""
    model, adatas = tiny_model(np.where(np.arange(40) % 2, "b1", "b0"))
    model.save(tmp_path / "run")
    protein = adatas["protein"]
    loaded = DIAGVI.load(
        tmp_path / "run", {"rna": adatas["rna"], "protein": protein[protein.obs["donor"] == "b1"]}
    )
    with pytest.raises(DataError, match=r"target_batch 'b0' of modality 'protein' has no cells"):
        loaded.get_imputed_values("rna", method="knn", target_batch="b0")
    in_b1 = loaded.get_imputed_values("rna", method="knn", target_batch="b1", n_neighbors=3)
    assert np.isfinite(in_b1).all()
    decoded = loaded.get_imputed_values("rna", target_batch="b0", target_libsize=100.0)
    np.testing.assert_array_equal(
        decoded, model.get_imputed_values("rna", target_batch="b0", target_libsize=100.0)
    )


# ----------------------------------------------------------------------------- kNN memory


@pytest.mark.parametrize("n_target", [50, 4000])
def test_knn_imputation_never_gathers_cells_x_k_x_features(n_target):
    """Memory stays near the result's block; the values are the neighbours' mean profiles.

    With more reference cells than ``batch_size * k`` (4,000), a block's neighbours are
    (almost) all distinct: reading them at once held ``batch_size * k * features`` values.
    """
    rng = np.random.default_rng(0)
    n_source, n_features, k = 200, 500, 20
    x = rng.poisson(3.0, (n_target, n_features)).astype(np.float32)
    target = ModalityData(
        "protein",
        x,
        np.zeros(n_target, dtype=np.int64),
        np.full(n_target, -1, dtype=np.int64),
        pd.Index([f"c{i}" for i in range(n_target)]),
        pd.Index([f"p{j}" for j in range(n_features)]),
        ["0"],
        ModalitySetup(),
    )
    z_source = rng.normal(size=(n_source, 3)).astype(np.float32)
    z_target = rng.normal(size=(n_target, 3)).astype(np.float32)
    library = np.full(n_source, 100.0, dtype=np.float32)
    tracemalloc.start()
    try:
        imputed = inference.knn_imputed_values(
            z_source, z_target, target, library, k=k, batch_size=n_source
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    gathered = n_source * k * n_features * 8  # 16 MB; the result itself is 0.4 MB
    assert peak < gathered / 4, f"peak {peak / 2**20:.1f} MiB"
    dist = ((z_source[:, None] - z_target[None]) ** 2).sum(-1)
    profiles = x / x.sum(1, keepdims=True)
    expected = 100.0 * profiles[np.argsort(dist, 1)[:, :k]].mean(1)
    np.testing.assert_allclose(imputed, expected, rtol=1e-5)
    # the same without library (continuous values): the plain mean of the neighbours
    plain = inference.knn_imputed_values(z_source, z_target, target, None, k=k, batch_size=7)
    np.testing.assert_allclose(plain, x[np.argsort(dist, 1)[:, :k]].mean(1), rtol=1e-5)


# ----------------------------------------------------------------------------- argument errors


def test_inference_inputs_must_be_anndata_by_modality():
    """A bare AnnData or matrix fails with a TypeError naming what is expected (and the
    modality), not an AttributeError from inside."""
    model, adatas = tiny_model()
    rna = adatas["rna"]
    with pytest.raises(TypeError, match=r"adatas must be a dict .*got AnnData"):
        model.get_latent_representation(rna)
    with pytest.raises(TypeError, match=r"adatas must be a dict"):
        model.posterior_predictive_sample(adatas=rna)
    with pytest.raises(TypeError, match=r"modality 'rna': expected an AnnData, got csr_matrix"):
        model.get_latent_representation({"rna": rna.X})
    with pytest.raises(TypeError, match=r"modality 'rna': expected an AnnData"):
        model.get_imputed_values("rna", rna.X)
