"""The encoder's principal-component input (``encoder_pcs``): fit, training, save/load, checks."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from diagvi import DIAGVI, DataError
from diagvi.data import ModalitySetup
from diagvi.nn import PrincipalComponents
from diagvi.synthetic import make_synthetic_pair
from diagvi.train import build_datamodule, build_model


def pair(rna_pcs: int | None = 6, n_cells: int = 160):
    adatas, mapping = make_synthetic_pair(n_cells=n_cells, n_genes=40, n_proteins=10, seed=3)
    DIAGVI.setup_anndata(adatas["rna"], labels_key="cell_type", encoder_pcs=rna_pcs)
    DIAGVI.setup_anndata(adatas["protein"])
    return adatas, mapping


# ----------------------------------------------------------------------------- the projection


def test_components_are_the_top_principal_axes_of_the_sample():
    gen = torch.Generator().manual_seed(0)
    # three strong directions plus noise, shifted away from the origin
    x = torch.randn(300, 3, generator=gen) * torch.tensor([5.0, 3.0, 2.0])
    x = x @ torch.linalg.qr(torch.randn(12, 12, generator=gen))[0][:3] + 4.0
    x = x + 0.05 * torch.randn(300, 12, generator=gen)
    pcs = PrincipalComponents(12, 3).fit(x)
    scores = pcs(x)
    assert scores.shape == (300, 3)
    assert torch.allclose(scores.mean(0), torch.zeros(3), atol=1e-4)  # centred
    assert torch.allclose(pcs.components.T @ pcs.components, torch.eye(3), atol=1e-5)
    centred = (x - x.mean(0)).double()
    top = torch.linalg.eigvalsh(centred.T @ centred).flip(0)[:3]
    explained = (scores.double().square().sum(0)).sort(descending=True).values
    assert torch.allclose(explained, top, rtol=1e-4)


def test_refits_agree_and_large_inputs_use_the_randomised_solver():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(400, 60, generator=gen) @ torch.randn(60, 60, generator=gen)
    a = PrincipalComponents(60, 5).fit(x, seed=0)  # 5 + 10 < 60: svd_lowrank
    b = PrincipalComponents(60, 5).fit(x, seed=0)
    exact = PrincipalComponents(60, 55).fit(x)  # full SVD
    assert torch.equal(a.components, b.components)
    # same subspace as the exact components, each column up to numerical error
    overlap = (a.components.T @ exact.components[:, :5]).abs().diagonal()
    assert bool((overlap > 0.99).all())


def test_fewer_cells_than_components_leaves_zero_columns():
    x = torch.randn(4, 10)
    pcs = PrincipalComponents(10, 8).fit(x)
    assert pcs(x).shape == (4, 8) and torch.isfinite(pcs(x)).all()
    assert torch.count_nonzero(pcs.components[:, 4:]) == 0


def test_unfitted_or_impossible_sizes_raise():
    with pytest.raises(RuntimeError, match="before fit"):
        PrincipalComponents(5, 2)(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="n_components"):
        PrincipalComponents(5, 6)


# ----------------------------------------------------------------------------- the model


def test_model_trains_on_principal_components_and_round_trips(tmp_path):
    adatas, mapping = pair(rna_pcs=6)
    model = DIAGVI(adatas, mapping_df=mapping, n_latent=8, seed=0)
    module = model.module
    assert list(module.pcs) == ["rna"] and module.x2z["rna"].body[0].in_features == 6
    assert module.x2z["protein"].body[0].in_features == adatas["protein"].n_vars
    assert bool(module.pcs["rna"].fitted)
    history = model.train(max_epochs=30, batch_size=64, accelerator="cpu", early_stopping=False)
    loss = history["train/loss"].to_numpy()
    assert np.isfinite(loss).all() and loss[-5:].mean() < loss[:5].mean()
    z = model.get_latent_representation()
    assert z["rna"].shape == (adatas["rna"].n_obs, 8) and np.isfinite(z["rna"]).all()
    # the decoder still imputes every feature
    imputed = model.get_imputed_values(source_name="protein")
    assert imputed.shape == (adatas["protein"].n_obs, adatas["rna"].n_vars)

    model.save(tmp_path, save_anndata=True)
    loaded = DIAGVI.load(tmp_path)  # the setup comes back from the h5ad as numpy integers
    assert loaded.setups["rna"].encoder_pcs == 6
    assert torch.equal(loaded.module.pcs["rna"].components, module.pcs["rna"].components)
    z2 = loaded.get_latent_representation()
    assert all(np.array_equal(z[m], z2[m]) for m in z)


def test_new_cells_are_projected_with_the_training_components():
    adatas, mapping = pair(rna_pcs=5)
    model = DIAGVI(adatas, mapping_df=mapping, n_latent=8, seed=0)
    model.train(max_epochs=2, batch_size=64, accelerator="cpu", early_stopping=False)
    components = model.module.pcs["rna"].components.clone()
    subset = adatas["rna"][:30].copy()
    z_subset = model.get_latent_representation({"rna": subset})["rna"]
    z_all = model.get_latent_representation()["rna"]
    np.testing.assert_allclose(z_subset, z_all[:30], rtol=1e-5, atol=1e-6)
    assert torch.equal(model.module.pcs["rna"].components, components)  # never refitted


@pytest.mark.parametrize("bad", [0, -3, 2.5, "30", True])
def test_encoder_pcs_must_be_a_positive_integer(bad):
    with pytest.raises(DataError, match="encoder_pcs must be a positive integer"):
        ModalitySetup(encoder_pcs=bad)


def test_more_components_than_features_is_refused_before_training():
    adatas, mapping = pair(rna_pcs=None)
    DIAGVI.setup_anndata(adatas["protein"], encoder_pcs=11)  # 10 proteins
    with pytest.raises(DataError, match=r"'protein'.*encoder_pcs=11 exceeds its 10 features"):
        DIAGVI(adatas, mapping_df=mapping)


def test_setup_is_stored_without_the_option_when_unused():
    rna = ad.AnnData(np.ones((3, 2), dtype=np.float32))
    DIAGVI.setup_anndata(rna)
    assert "encoder_pcs" not in rna.uns["diagvi_setup"]
    DIAGVI.setup_anndata(rna, encoder_pcs=2)
    assert rna.uns["diagvi_setup"]["encoder_pcs"] == 2


def test_hydra_data_config_sets_the_option():
    configs = str(Path(__file__).resolve().parent.parent / "configs")
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        cfg = compose("train", overrides=["data=synthetic", "data.modalities.rna.encoder_pcs=7"])
    dm, spec, _ = build_datamodule(cfg)
    assert spec.modalities["rna"].encoder_pcs == 7
    assert spec.modalities["protein"].encoder_pcs is None
    module = build_model(cfg.model, spec, dm.data).module
    assert bool(module.pcs["rna"].fitted) and module.x2z["rna"].body[0].in_features == 7
    batch = next(iter(dm.train_dataloader()))
    terms = module.loss_terms(batch)
    assert all(torch.isfinite(t) for t in terms.values())
