"""End-to-end training on a synthetic pair with known pairing: the model must learn to align."""

from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir

from diagvi import DIAGVI
from diagvi.inference import latent_representation
from diagvi.outputs import paired_foscttm
from diagvi.synthetic import make_synthetic_pair
from diagvi.train import build_datamodule, build_model

CONFIGS = str(Path(__file__).resolve().parent.parent / "configs")


class LossHistory(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def foscttm_of(lit, dm) -> float:
    latents = {m: latent_representation(lit.module, d) for m, d in dm.data.items()}
    return paired_foscttm(latents, dm.data)["foscttm"]


@pytest.fixture(scope="module")
def trained():
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        # reach_scale=1: strongly unbalanced transport, robust on this small synthetic pair
        cfg = compose("train", overrides=["data=synthetic", "model.alignment.reach_scale=1.0"])
    L.seed_everything(cfg.seed)
    dm, spec, _ = build_datamodule(cfg)
    lit = build_model(cfg.model, spec)
    before = foscttm_of(lit, dm)
    history = LossHistory()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=80,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[history],
    )
    trainer.fit(lit, datamodule=dm)
    return before, foscttm_of(lit, dm), history.losses


def test_total_loss_falls(trained):
    _, _, losses = trained
    assert losses[-1] < 0.7 * losses[0]
    assert min(losses[-5:]) < min(losses[:5])


def test_alignment_recovers_pairing(trained):
    before, after, _ = trained
    assert 0.4 < before < 0.6  # an untrained model is at chance
    assert after < 0.3
    assert after < before - 0.15


def test_labels_transfer_across_modalities_far_above_chance():
    """Labels seen only in RNA are transferred to the protein cells (4 types: chance 0.25)."""
    adatas, mapping = make_synthetic_pair(n_cells=400, seed=0)
    truth = adatas["protein"].obs["cell_type"].astype(str).to_numpy()
    protein = adatas["protein"].copy()
    del protein.obs["cell_type"]
    DIAGVI.setup_anndata(adatas["rna"], labels_key="cell_type", likelihood="nb")
    DIAGVI.setup_anndata(protein, likelihood="nb")
    model = DIAGVI({"rna": adatas["rna"], "protein": protein}, mapping_df=mapping)
    model.train(max_epochs=60, accelerator="cpu", early_stopping=False)
    for method in ("classifier", "knn"):
        predicted = model.predict_celltype("rna", "protein", method=method)["predictions"]
        assert (predicted == truth).mean() > 0.8, method


def test_fit_moves_minibatches_without_lightning_warnings():
    """The data module moves its ``{modality: {name: tensor}}`` minibatches itself, and a fit
    through ``DIAGVI.train`` raises no warning about where that hook lives."""
    import warnings

    import torch
    from lightning.pytorch.trainer.connectors import data_connector

    from diagvi.data import PairedDataModule

    adatas, mapping = make_synthetic_pair(n_cells=60, n_genes=12, n_proteins=4)
    for adata in adatas.values():
        DIAGVI.setup_anndata(adata)
    model = DIAGVI(adatas, mapping_df=mapping, n_latent=4)
    dm = PairedDataModule(model.data, batch_size=16)
    batch = next(iter(dm.train_dataloader()))
    moved = dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert moved.keys() == batch.keys()
    for m, tensors in batch.items():
        assert moved[m].keys() == tensors.keys()
        assert all(torch.equal(moved[m][k], t) for k, t in tensors.items())
    data_connector.warning_cache.clear()  # Lightning warns once per process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train(max_epochs=1, accelerator="cpu", batch_size=16, early_stopping=False)
    assert not [w for w in caught if "transfer_batch_to_device" in str(w.message)]


def test_trainer_prints_no_lightning_advert():
    """Building a Trainer logs Lightning's own facts (accelerator) but not its advertisement
    for a cloud logger (filtered by ``diagvi.lit``)."""
    import logging

    import diagvi.lit  # noqa: F401  (installs the filter)

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    handler, level = Keep(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        L.Trainer(logger=False, accelerator="cpu", enable_progress_bar=False)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert any("GPU available" in r for r in records)
    assert not any("litlogger" in r for r in records)
