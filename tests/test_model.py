"""The DIAGVI user API on a small synthetic pair with a few epochs of CPU training."""

from __future__ import annotations

import inspect
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from diagvi import DIAGVI, DataError
from diagvi.lit import DEFAULT_WEIGHTS
from diagvi.synthetic import make_synthetic_pair

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EPOCHS = 4


def synthetic(labels: bool = True):
    adatas, mapping = make_synthetic_pair(n_cells=200, n_genes=40, n_proteins=10)
    rna, protein = adatas["rna"], adatas["protein"]
    rna.obs["cell_type"] = rna.obs["cell_type"].astype(str)
    rna.obs.loc[rna.obs_names[::5], "cell_type"] = "unknown"  # some unlabelled cells
    protein.obs["batch"] = np.where(np.arange(protein.n_obs) % 2, "b1", "b0")
    DIAGVI.setup_anndata(rna, labels_key="cell_type" if labels else None)
    DIAGVI.setup_anndata(protein, batch_key="batch")
    return adatas, mapping


def small_model() -> DIAGVI:
    """An untrained model of a 120-cell synthetic pair, no labels or batches."""
    adatas, mapping = make_synthetic_pair(n_cells=120, n_genes=30, n_proteins=6)
    for adata in adatas.values():
        DIAGVI.setup_anndata(adata)
    return DIAGVI(adatas, mapping_df=mapping, n_latent=4)


@pytest.fixture(scope="module")
def trained():
    adatas, mapping = synthetic()
    before = {m: a.copy() for m, a in adatas.items()}
    model = DIAGVI(adatas, mapping_df=mapping, n_latent=8)
    model.train(max_epochs=EPOCHS, accelerator="cpu", batch_size=64)
    return model, adatas, before


# ----------------------------------------------------------------------------- construction


def test_setup_anndata_writes_plain_dict_and_checks_likelihood():
    adatas, _ = make_synthetic_pair(n_cells=20, n_genes=10, n_proteins=5)
    DIAGVI.setup_anndata(adatas["rna"], labels_key="cell_type", likelihood="zinb")
    setup = adatas["rna"].uns["diagvi_setup"]
    assert type(setup) is dict
    assert setup["likelihood"] == "zinb" and setup["labels_key"] == "cell_type"
    with pytest.raises(DataError, match="nb.*normal"):
        DIAGVI.setup_anndata(adatas["protein"], likelihood="poisson")
    with pytest.raises(DataError, match="not an obs column"):
        DIAGVI.setup_anndata(adatas["protein"], batch_key="nope")


def test_rejects_other_containers_and_missing_setup():
    adatas, _ = make_synthetic_pair(n_cells=20, n_genes=10, n_proteins=5)
    with pytest.raises(TypeError, match="dict"):
        DIAGVI(list(adatas.values()))
    with pytest.raises(DataError, match="setup_anndata"):
        DIAGVI(adatas)


def test_mudata_input():
    mudata = pytest.importorskip("mudata")
    adatas, mapping = synthetic()
    model = DIAGVI(mudata.MuData(adatas), mapping_df=mapping)
    assert set(model.data) == {"rna", "protein"}


def test_defaults_are_those_of_the_configs():
    cfg = OmegaConf.load(CONFIGS / "model" / "diagvi.yaml")
    init = inspect.signature(DIAGVI.__init__).parameters
    train = inspect.signature(DIAGVI.train).parameters
    assert init["n_latent"].default == cfg.n_latent
    for key, value in cfg.encoder.items():
        assert init[key].default == value
    for key, value in DEFAULT_WEIGHTS.items():
        assert train[key].default == cfg[key] == value
    assert train["lr"].default == cfg.lr and train["weight_decay"].default == cfg.weight_decay
    defaults = {d if isinstance(d, str) else next(iter(d.items())) for d in cfg.defaults}
    assert ("prior", init["prior"].default or "normal") in defaults
    for key in ("graph_encoder", "alignment", "classifier"):
        assert (key, init[key].default) in defaults


# ----------------------------------------------------------------------------- training


def test_history_has_every_term_per_epoch(trained):
    model, _, _ = trained
    h = model.history
    assert len(h) == EPOCHS
    for stage in ("train", "val"):
        for term in (
            "loss",
            "nll/rna",
            "nll/protein",
            "kl/rna",
            "kl/protein",
            "align",
            "spread/rna",
            "spread/protein",
        ):
            assert f"{stage}/{term}" in h.columns
        assert f"{stage}/graph/nll" in h.columns and f"{stage}/cls/rna" in h.columns
    assert np.isfinite(h.to_numpy()).all()


def test_user_anndata_unchanged(trained):
    _, adatas, before = trained
    for m, adata in adatas.items():
        old = before[m]
        assert (adata.X != old.X).nnz == 0 if m == "rna" else np.array_equal(adata.X, old.X)
        assert adata.obs.equals(old.obs) and adata.var.equals(old.var)
        assert set(adata.uns) == set(old.uns) == {"diagvi_setup"}


# ----------------------------------------------------------------------------- inference


def test_latent_mean_is_deterministic_and_sample_varies(trained):
    model, adatas, _ = trained
    z = model.get_latent_representation()
    assert {m: v.shape for m, v in z.items()} == {"rna": (200, 8), "protein": (200, 8)}
    assert all(np.isfinite(v).all() and v.dtype == np.float32 for v in z.values())
    again = model.get_latent_representation()
    assert all(np.array_equal(z[m], again[m]) for m in z)
    sample = model.get_latent_representation(give_mean=False)
    assert all(not np.allclose(z[m], sample[m]) for m in z)
    subset = model.get_latent_representation({"protein": adatas["protein"][50:80]})
    np.testing.assert_array_equal(subset["protein"], z["protein"][50:80])


def test_imputation_scale_batch_and_aliases(trained):
    model, adatas, _ = trained
    imputed = model.get_imputed_values("rna", target_libsize=10000)
    assert imputed.shape == (200, 10)
    assert np.isfinite(imputed).all() and (imputed >= 0).all()
    doubled = model.get_imputed_values("rna", target_libsize=20000)
    np.testing.assert_allclose(doubled, 2 * imputed, rtol=1e-5)
    per_cell = np.linspace(100, 1000, 200)
    np.testing.assert_allclose(
        model.get_imputed_values("rna", target_libsize=per_cell).sum(1), per_cell, rtol=1e-4
    )
    median = np.median(adatas["protein"].X.sum(1))
    np.testing.assert_allclose(model.get_imputed_values("rna").sum(1), median, rtol=1e-4)
    by_name = model.get_imputed_values("rna", target_batch="b1", target_libsize=10000)
    by_index = model.get_imputed_values("rna", target_batch=1, target_libsize=10000)
    np.testing.assert_array_equal(by_name, by_index)
    alias = model.get_imputed_values(
        query_name="rna",
        query_adata=adatas["rna"],
        reference_batch="b1",
        reference_libsize=10000,
    )
    np.testing.assert_array_equal(alias, by_name)
    with pytest.raises(DataError, match=r"valid batches: \['b0', 'b1'\]"):
        model.get_imputed_values("rna", target_batch="b7")
    protein_to_rna = model.get_imputed_values("protein", target_libsize=5000)
    assert protein_to_rna.shape == (200, 40)


@pytest.mark.parametrize("method", ["classifier", "knn"])
def test_predict_celltype(trained, method):
    model, adatas, _ = trained
    out = model.predict_celltype("rna", "protein", method=method)
    probs = out["probabilities"]
    classes = ["type_0", "type_1", "type_2", "type_3"]
    assert list(probs.columns) == classes  # the unlabelled category is no class
    assert probs.index.equals(adatas["protein"].obs_names)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    assert set(out["predictions"]) <= set(classes)
    np.testing.assert_allclose(out["confidence"], probs.max(1))


def test_knn_transfer_within_modality_beats_chance(trained):
    model, adatas, _ = trained
    out = model.predict_celltype("rna", "rna", method="knn", k=5)
    truth = make_synthetic_pair(n_cells=200, n_genes=40, n_proteins=10)[0]["rna"].obs
    assert (out["predictions"] == truth["cell_type"].astype(str).to_numpy()).mean() > 0.5


def test_same_seed_same_model_and_global_rng_untouched():
    adatas, mapping = synthetic()
    runs = []
    for _ in range(2):
        torch.rand(7)  # other draws from the global stream must not change the model
        state = torch.get_rng_state()
        model = DIAGVI(adatas, mapping_df=mapping, n_latent=8, seed=3)
        assert torch.equal(torch.get_rng_state(), state)
        weights = {k: v.clone() for k, v in model.module.state_dict().items()}
        model.train(max_epochs=2, accelerator="cpu", batch_size=64, seed=5)
        runs.append((weights, model.get_latent_representation()))
    (first, latent_a), (second, latent_b) = runs
    assert all(torch.equal(first[k], second[k]) for k in first)
    for m in latent_a:
        np.testing.assert_array_equal(latent_a[m], latent_b[m])
    other = DIAGVI(adatas, mapping_df=mapping, n_latent=8, seed=4).module.state_dict()
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


def test_classifier_learns_the_labelled_cells():
    # the latent's scale is small (sd ~0.1); the classifier must still leave chance (0.25)
    adatas, mapping = synthetic()
    model = DIAGVI(adatas, mapping_df=mapping, n_latent=8)
    model.train(max_epochs=30, accelerator="cpu", batch_size=64, early_stopping=False, seed=0)
    out = model.predict_celltype("rna", "rna", method="classifier")
    truth = make_synthetic_pair(n_cells=200, n_genes=40, n_proteins=10)[0]["rna"].obs
    assert (out["predictions"] == truth["cell_type"].astype(str).to_numpy()).mean() > 0.8
    assert out["confidence"].mean() > 0.5


def test_predict_celltype_without_labels_raises():
    adatas, mapping = synthetic(labels=False)
    model = DIAGVI(adatas, mapping_df=mapping)
    with pytest.raises(DataError, match="labels_key"):
        model.predict_celltype()


def test_posterior_predictive_sample(trained):
    model, _, _ = trained
    samples = model.posterior_predictive_sample(n_samples=3)
    assert samples["rna"].shape == (3, 200, 40) and samples["protein"].shape == (3, 200, 10)
    for s in samples.values():
        assert np.isfinite(s).all() and (s >= 0).all() and np.array_equal(s, np.round(s))
    assert not np.array_equal(samples["rna"][0], samples["rna"][1])


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip(trained, tmp_path):
    model, adatas, _ = trained
    model.save(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model.pt"]
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert saved["attrs"]["var_names"]["protein"] == list(adatas["protein"].var_names)
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "run")
    state = torch.get_rng_state()
    loaded = DIAGVI.load(tmp_path / "run", adatas)
    assert torch.equal(torch.get_rng_state(), state)  # loading leaves the caller's RNG alone
    before, after = model.get_latent_representation(), loaded.get_latent_representation()
    assert all(np.array_equal(before[m], after[m]) for m in before)
    np.testing.assert_array_equal(
        loaded.get_imputed_values("rna", target_libsize=100),
        model.get_imputed_values("rna", target_libsize=100),
    )
    assert loaded.history.equals(model.history)
    model.save(tmp_path / "run", save_anndata=True, overwrite=True)
    restored = DIAGVI.load(tmp_path / "run")
    assert np.array_equal(restored.get_latent_representation()["rna"], before["rna"])


def test_load_rejects_other_features(trained, tmp_path):
    model, adatas, _ = trained
    model.save(tmp_path / "run")
    swapped = adatas["protein"][:, ::-1].copy()
    with pytest.raises(DataError, match=r"'protein'.*protein_9"):
        DIAGVI.load(tmp_path / "run", {"rna": adatas["rna"], "protein": swapped})
    fewer = ad.AnnData(adatas["protein"].X[:, :5], obs=adatas["protein"].obs)
    with pytest.raises(DataError, match="10 features"):
        DIAGVI.load(tmp_path / "run", {"rna": adatas["rna"], "protein": fewer})


def test_decoder_starts_at_the_data_average():
    model = small_model()
    x = model.data["rna"].X
    x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)
    beta = model.module.z2x["rna"].beta.detach()
    assert beta.shape[0] == 1
    np.testing.assert_allclose(
        torch.softmax(beta[0].double(), 0).numpy(),
        (x / x.sum(1, keepdims=True)).mean(0),
        rtol=1e-4,
        atol=1e-7,
    )


def test_load_matches_batches_and_labels_by_name(trained, tmp_path):
    model, adatas, _ = trained
    model.save(tmp_path / "run")
    rna = adatas["rna"].copy()
    del rna.obs["cell_type"]  # query cells without labels
    protein = adatas["protein"][adatas["protein"].obs["batch"] == "b1"].copy()
    protein.obs["batch"] = protein.obs["batch"].astype("category").cat.set_categories(["b1", "b0"])
    loaded = DIAGVI.load(tmp_path / "run", {"rna": rna, "protein": protein})
    assert loaded.data["protein"].batch_categories == ["b0", "b1"]
    assert (loaded.data["protein"].batch == 1).all() and (loaded.data["rna"].labels == -1).all()
    np.testing.assert_array_equal(
        loaded.get_latent_representation()["rna"], model.get_latent_representation()["rna"]
    )
    np.testing.assert_array_equal(
        loaded.get_imputed_values("rna", target_batch="b1", target_libsize=100),
        model.get_imputed_values("rna", target_batch="b1", target_libsize=100),
    )
    protein.obs["batch"] = "b9"
    with pytest.raises(DataError, match=r"batches \['b9'\] were not batches of the saved"):
        DIAGVI.load(tmp_path / "run", {"rna": rna, "protein": protein})


def test_save_without_anndata_leaves_no_earlier_anndata(trained, tmp_path):
    model, _, _ = trained
    model.save(tmp_path / "run", save_anndata=True)
    model.save(tmp_path / "run", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model.pt"]
    with pytest.raises(DataError, match="saved without its AnnData"):
        DIAGVI.load(tmp_path / "run")


def test_numpy_arguments_save_and_load(tmp_path):
    adatas, mapping = make_synthetic_pair(n_cells=60, n_genes=20, n_proteins=6)
    for adata in adatas.values():
        DIAGVI.setup_anndata(adata)
    model = DIAGVI(
        adatas,
        mapping_df=mapping,
        n_latent=np.int64(4),
        n_hidden=np.int64(32),
        dropout=np.linspace(0, 0.2, 3)[1],
        alignment_kwargs={"reach_scale": np.float32(5.0)},
    )
    model.save(tmp_path / "run")
    loaded = DIAGVI.load(tmp_path / "run", adatas)
    assert loaded.init_args == model.init_args
    assert type(loaded.init_args["encoder"]["dropout"]) is float
    np.testing.assert_array_equal(
        loaded.get_latent_representation()["rna"], model.get_latent_representation()["rna"]
    )


def test_plots_save_files_and_return_figures(tmp_path):
    from matplotlib.figure import Figure

    adatas, mapping = make_synthetic_pair(n_cells=80, n_genes=20, n_proteins=6, seed=3)
    DIAGVI.setup_anndata(adatas["rna"], labels_key="cell_type")
    DIAGVI.setup_anndata(adatas["protein"])
    model = DIAGVI(adatas, mapping_df=mapping, n_latent=4, n_hidden=16, n_layers=1)
    with pytest.raises(RuntimeError, match="train"):
        model.plot_history()
    model.train(max_epochs=2, accelerator="cpu", batch_size=32)
    assert isinstance(model.plot_embedding(), Figure)
    assert isinstance(model.plot_history(), Figure)
    for name, plot in (("embedding", model.plot_embedding), ("history", model.plot_history)):
        path = plot(tmp_path / f"{name}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_validation_runs_with_early_stopping_or_when_asked():
    model = small_model()
    h = model.train(max_epochs=2, accelerator="cpu", batch_size=32, early_stopping=False)
    assert len(h) == 2 and not any(c.startswith("val/") for c in h.columns)
    assert np.isfinite(h["train/loss"]).all() and h["train/skipped_steps"].eq(0).all()
    h = model.train(
        max_epochs=2,
        accelerator="cpu",
        batch_size=32,
        early_stopping=False,
        check_val_every_n_epoch=1,
    )
    assert "val/loss" in h.columns and np.isfinite(h["val/loss"]).all()


def test_training_again_trains_in_train_mode():
    """A second ``train()`` (or one after inference) trains with dropout on, as the first."""
    model = small_model()
    model.train(max_epochs=2, accelerator="cpu", batch_size=32, early_stopping=False)
    steps = int(model.module.alignment.step)  # counts training steps only
    assert steps > 0 and not model.module.training
    model.get_latent_representation()
    model.train(max_epochs=2, accelerator="cpu", batch_size=32, early_stopping=False)
    assert int(model.module.alignment.step) == 2 * steps


def test_history_has_validation_only_where_validated():
    """Epochs without validation have NaN there, not the last value or the sanity check's."""
    model = small_model()
    h = model.train(
        max_epochs=5,
        accelerator="cpu",
        batch_size=32,
        early_stopping=False,
        check_val_every_n_epoch=2,
    )
    validated = h["val/loss"].notna().to_numpy()
    assert validated.tolist() == [False, True, False, True, False]
    assert np.isfinite(h["train/loss"]).all()


def test_integer_batch_names_are_names_not_positions():
    adatas, mapping = make_synthetic_pair(n_cells=80, n_genes=20, n_proteins=6)
    protein = adatas["protein"]
    protein.obs["donor"] = np.where(np.arange(protein.n_obs) % 2, 2, 1)  # donors 1 and 2
    DIAGVI.setup_anndata(adatas["rna"])
    DIAGVI.setup_anndata(protein, batch_key="donor")
    model = DIAGVI(adatas, mapping_df=mapping, n_latent=4)
    model.train(max_epochs=2, accelerator="cpu", batch_size=32, early_stopping=False)
    by_int = model.get_imputed_values("rna", target_batch=1, target_libsize=1000)
    by_name = model.get_imputed_values("rna", target_batch="1", target_libsize=1000)
    other = model.get_imputed_values("rna", target_batch="2", target_libsize=1000)
    assert np.allclose(by_int, by_name) and not np.allclose(by_int, other)
    per_cell = protein.obs["donor"].to_numpy()[: adatas["rna"].n_obs]
    mixed = model.get_imputed_values("rna", target_batch=per_cell, target_libsize=1000)
    assert np.allclose(mixed[per_cell == 2], other[per_cell == 2])
    with pytest.raises(DataError, match="numeric batch names are read as names"):
        model.get_imputed_values("rna", target_batch=0)


def test_bad_arguments_fail_with_their_name(trained):
    model, adatas, _ = trained
    n = adatas["rna"].n_obs
    with pytest.raises(DataError, match=rf"target_libsize .*'protein'.*one per cell \({n}\)"):
        model.get_imputed_values("rna", target_libsize=[1000.0] * 3)
    with pytest.raises(DataError, match="target_batch .*one per cell"):
        model.get_imputed_values("rna", target_batch=["b0", "b1"])
    for libsize in (-5.0, float("nan"), 0.0):
        with pytest.raises(ValueError, match="target_libsize must be finite and positive"):
            model.get_imputed_values("rna", target_libsize=libsize)
    with pytest.raises(ValueError, match="n_neighbors must be a positive integer"):
        model.get_imputed_values("rna", method="knn", n_neighbors=0)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        model.predict_celltype("rna", "protein", method="knn", k=0)
    for kwargs in ({"batch_size": 0}, {"max_epochs": 0}, {"batch_size": 2.5}):
        with pytest.raises(ValueError, match="must be a positive integer"):
            model.train(accelerator="cpu", **{"max_epochs": 1, **kwargs})
    for call in (
        lambda: model.get_imputed_values("rna", batch_size=0),
        lambda: model.get_latent_representation(batch_size=-5),
        lambda: model.posterior_predictive_sample(batch_size=0),
    ):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            call()
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        model.posterior_predictive_sample(n_samples=0)
    small, big = (model.get_latent_representation(batch_size=b)["rna"] for b in (7, 1024))
    np.testing.assert_allclose(small, big, rtol=1e-5, atol=1e-6)


def test_run_outputs_follow_the_cells_read_when_empty_ones_are_dropped(tmp_path):
    """``empty="drop"``: the latent files hold the kept cells, with their names."""
    from diagvi.outputs import write_run_outputs

    adatas, mapping = make_synthetic_pair(n_cells=60, n_genes=20, n_proteins=6)
    rna = adatas["rna"]
    rna.X = rna.X.copy()
    rna.X[3] = 0  # an all-zero cell
    DIAGVI.setup_anndata(rna, empty="drop")
    DIAGVI.setup_anndata(adatas["protein"])
    with pytest.warns(UserWarning, match="all-zero"):
        model = DIAGVI(adatas, mapping_df=mapping, n_latent=4)
    write_run_outputs(model.module, model.data, adatas, tmp_path)
    latent = ad.read_h5ad(tmp_path / "latent_rna.h5ad")
    assert latent.n_obs == rna.n_obs - 1 == latent.obsm["X_diagvi"].shape[0]
    assert list(latent.obs_names) == [n for i, n in enumerate(rna.obs_names) if i != 3]
    assert ad.read_h5ad(tmp_path / "latent_protein.h5ad").n_obs == adatas["protein"].n_obs


def test_knn_imputation_averages_measured_neighbours(trained):
    model, adatas, _ = trained
    protein = adatas["protein"]
    imputed = model.get_imputed_values("rna", method="knn", target_libsize=500.0, n_neighbors=5)
    assert imputed.shape == (adatas["rna"].n_obs, protein.n_vars)
    assert (imputed >= 0).all()
    np.testing.assert_allclose(imputed.sum(1), 500.0, rtol=1e-4)  # profiles on the library
    # each imputed profile is the mean of 5 measured, depth-normalised protein profiles
    profiles = protein.X / protein.X.sum(1, keepdims=True)
    z = model.get_latent_representation()
    dist = ((z["rna"][:3, None] - z["protein"][None]) ** 2).sum(-1)
    for i, row in enumerate(np.argsort(dist, 1)[:, :5]):
        np.testing.assert_allclose(imputed[i], 500.0 * profiles[row].mean(0), rtol=1e-3)
    # one target batch: neighbours only among that batch's cells
    in_b1 = model.get_imputed_values("rna", method="knn", target_batch="b1", n_neighbors=5)
    b1 = np.flatnonzero(protein.obs["batch"].to_numpy() == "b1")
    nearest_b1 = b1[np.argsort(dist[:, b1], 1)[:, :5]]
    lib = np.median(protein.X.sum(1))  # default library: the target's median
    np.testing.assert_allclose(in_b1[:3], lib * profiles[nearest_b1].mean(1), rtol=1e-3)
    with pytest.raises(ValueError, match="method"):
        model.get_imputed_values("rna", method="nearest")
