"""Audit of ``python -m diagvi.train`` and ``configs/``: documented overrides compose, and bad
config values are refused before training with an error naming their key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

from diagvi.errors import DataError
from diagvi.train import build_datamodule, check_config, run

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
TINY = [
    "data=synthetic",
    "data.load.n_cells=60",
    "data.load.n_genes=20",
    "data.load.n_proteins=6",
    "data.batch_size=32",
    "model.n_latent=4",
    "model.encoder.n_hidden=8",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "callbacks=none",
]


@pytest.fixture
def compose_cfg(tmp_path, monkeypatch):
    """The composed train config with ``${hydra:...}`` resolvable (as ``@hydra.main`` does)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")

    def make(overrides: list[str]):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        HydraConfig.instance().set_config(cfg)
        return cfg

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield make
    HydraConfig.instance().cfg = None


@pytest.mark.parametrize(
    "overrides",
    [
        # docs/cluster.md: "4 of them, and bfloat16 as in trainer=gpu"
        ["trainer=ddp", "trainer.devices=4", "trainer.precision=bf16-mixed"],
        # docs/cluster.md: "Full float32 on any GPU, e.g. to compare with a CPU run"
        ["trainer=cpu", "trainer.precision=32-true"],
        ["trainer.precision=bf16-mixed"],
    ],
)
def test_documented_precision_overrides_compose(compose_cfg, overrides):
    cfg = compose_cfg(["data=synthetic", "logger=none", "callbacks=none", *overrides])
    assert cfg.trainer.precision == overrides[-1].split("=")[1]


def test_default_trainer_precision_is_lightnings_and_gpu_keeps_bf16(compose_cfg):
    cfg = compose_cfg(["data=synthetic", "logger=none", "callbacks=none", "trainer=cpu"])
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.precision == "32-true"  # what Lightning does without the key
    assert compose_cfg(["trainer=gpu"]).trainer.precision == "bf16-mixed"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.batch_size=0", "data.batch_size"),  # was: ZeroDivisionError
        ("data.batch_size=-3", "data.batch_size"),
        ("data.batch_size=1.5", "data.batch_size"),
        ("data.num_workers=-1", "data.num_workers"),
        ("model.n_latent=0", "model.n_latent"),  # was: trained, reported FOSCTTM 0 (perfect)
        ("model.n_latent=2.5", "model.n_latent"),
        ("model.encoder.n_hidden=0", "model.encoder.n_hidden"),  # was: FOSCTTM 0 as well
        ("model.encoder.n_layers=-1", "model.encoder.n_layers"),
        ("model.encoder.dropout=1.5", "model.encoder.dropout"),
        ("model.lr=-1", "model.lr"),
        ("model.weight_decay=-1", "model.weight_decay"),
        ("model.lam_kl=-1", "model.lam_kl"),  # was: trained with a negative KL weight
        ("model.lam_sinkhorn=nan", "model.lam_sinkhorn"),
        ("model.nonfinite=bogus", "model.nonfinite"),
        ("seed=-5", "seed"),
        ("threads=0", "threads"),  # was: silently torch's default
        ("threads=-1", "threads"),
    ],
)
def test_bad_config_values_name_their_key(compose_cfg, override, key):
    cfg = compose_cfg([*TINY, override])
    with pytest.raises(DataError, match=rf"^{key} must be"):
        check_config(cfg)


def job_cfg(cfg):
    """The config ``@hydra.main`` hands the task: without the hydra node."""
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def test_run_refuses_bad_values_before_training(compose_cfg, tmp_path):
    with pytest.raises(DataError, match="^model.n_latent must be"):
        run(job_cfg(compose_cfg([*TINY, "model.n_latent=0"])))
    assert not (tmp_path / "run" / "metrics.json").exists()
    with pytest.raises(DataError, match="^data.batch_size must be"):
        run(job_cfg(compose_cfg([*TINY, "data.batch_size=0"])))
    with pytest.raises(DataError, match="^seed must be"):
        run(job_cfg(compose_cfg([*TINY, "seed=-5"])))


def test_default_configs_pass_the_checks(compose_cfg):
    for overrides in ([], TINY, ["experiment=synthetic_gmm"], ["model.lam_link=0", "threads=1"]):
        check_config(compose_cfg(overrides))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.modalities.protein.empty=bogus", "data.modalities.protein.empty must be one of"),
        ("data.modalities.rna.encoder_pcs=0", "data.modalities.rna.encoder_pcs must be"),
        ("data.modalities.rna.layer=3", "data.modalities.rna.layer must be a str"),
    ],
)
def test_modality_setup_errors_name_the_config_key(compose_cfg, override, message):
    with pytest.raises((DataError, TypeError), match=rf"^{message}"):
        build_datamodule(compose_cfg([*TINY, override]))
