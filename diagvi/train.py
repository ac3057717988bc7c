"""Hydra entry point: ``python -m diagvi.train`` (console script ``diagvi-train``).

Composes ``configs/train.yaml``, builds data, guidance graph and model from the config groups,
trains with Lightning and writes the run's outputs into Hydra's run directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from diagvi import outputs
from diagvi.data import DataSpec, ModalitySetup, PairedDataModule, read_modalities
from diagvi.errors import DataError
from diagvi.graph import build_guidance_graph
from diagvi.lit import DEFAULT_WEIGHTS, DiagVILightning
from diagvi.module import DiagVAE

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def likelihood_names(cfg: DictConfig) -> dict[str, str]:
    """Registered likelihood name of each modality, read from ``model.likelihood.<modality>``."""
    chosen = cfg.model.get("likelihood") or {}
    missing = [m for m in cfg.data.modalities if m not in chosen]
    if missing:
        raise DataError(
            f"no likelihood chosen for modality {missing}; add e.g. "
            f"`model/likelihood@model.likelihood.{missing[0]}=nb` (have: {list(chosen)})"
        )
    return {m: instantiate(chosen[m]).func.registry_name for m in cfg.data.modalities}


def build_datamodule(cfg: DictConfig) -> tuple[PairedDataModule, DataSpec, dict]:
    """Load the data named by ``cfg.data``, read and validate it, build the guidance graph."""
    adatas, mapping = instantiate(cfg.data.load)
    if sorted(adatas) != sorted(cfg.data.modalities):
        raise DataError(
            f"the data loader returned modalities {list(adatas)} but data.modalities names "
            f"{list(cfg.data.modalities)}; make them the same"
        )
    names = likelihood_names(cfg)
    setups = {
        m: ModalitySetup(**OmegaConf.to_container(cfg.data.modalities[m]), likelihood=names[m])
        for m in cfg.data.modalities
    }
    data, categories = read_modalities({m: adatas[m] for m in cfg.data.modalities}, setups)
    features = {m: d.var_names for m, d in data.items()}
    if cfg.data.get("mapping_path"):
        mapping = cfg.data.mapping_path
    if cfg.data.guidance == "mapping" and mapping is not None:
        graph = build_guidance_graph(features, mapping=mapping)
    elif cfg.data.guidance in ("mapping", "shared_names"):
        graph = build_guidance_graph(features)
    else:
        raise DataError(
            f"data.guidance must be 'mapping' or 'shared_names', got {cfg.data.guidance!r}"
        )
    spec = DataSpec.from_data(data, categories, graph)
    dm = PairedDataModule(
        data,
        batch_size=cfg.data.batch_size,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
    )
    return dm, spec, adatas


def build_model(cfg_model: DictConfig, spec: DataSpec) -> DiagVILightning:
    """DiagVAE from the component config groups, wrapped in the LightningModule."""
    module = DiagVAE(
        spec,
        n_latent=cfg_model.n_latent,
        likelihoods={m: instantiate(cfg_model.likelihood[m]) for m in spec.modalities},
        prior=instantiate(cfg_model.prior),
        graph_encoder=instantiate(cfg_model.graph_encoder),
        alignment=instantiate(cfg_model.alignment),
        classifier=instantiate(cfg_model.classifier) if cfg_model.get("classifier") else None,
        encoder=OmegaConf.to_container(cfg_model.encoder),
    )
    weights = {k: float(cfg_model[k]) for k in DEFAULT_WEIGHTS}
    return DiagVILightning(module, weights, lr=cfg_model.lr, weight_decay=cfg_model.weight_decay)


def _instantiate_all(group: DictConfig | None) -> list:
    return [instantiate(c) for c in (group or {}).values() if c is not None]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one model as configured and write its outputs; returns the run's metrics."""
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(
        cfg.get("run_dir") or hydra.core.hydra_config.HydraConfig.get().runtime.output_dir
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    dm, spec, adatas = build_datamodule(cfg)
    lit = build_model(cfg.model, spec)
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=_instantiate_all(cfg.get("callbacks"))
    )
    start = time.perf_counter()
    try:
        trainer.fit(lit, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
        seconds = time.perf_counter() - start
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        metrics.update(epochs=trainer.current_epoch, train_seconds=seconds)
        if cfg.get("write_outputs", True):
            metrics.update(
                outputs.write_run_outputs(
                    lit.module, dm.data, adatas, run_dir, paired=cfg.data.paired
                )
            )
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    finally:
        # close a started W&B run (even a failed one) so the next run in this process is clean
        if any(isinstance(lg, WandbLogger) and lg._experiment is not None for lg in loggers):
            import wandb

            wandb.finish()
    summary = f"diagvi: trained {metrics['epochs']} epochs in {metrics['train_seconds']:.0f} s"
    if "foscttm" in metrics:
        summary += f"; FOSCTTM {metrics['foscttm']:.3f} (0 = perfect pairing, 0.5 = random)"
    print(f"{summary}\ndiagvi: outputs in {run_dir}")
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Console entry point."""
    metrics = run(cfg)
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
