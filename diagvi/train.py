"""Hydra entry point: ``python -m diagvi.train`` (console script ``diagvi-train``).

Composes ``configs/train.yaml``, builds data, guidance graph and model from the config groups,
trains with Lightning and writes the run's outputs into Hydra's run directory. Returns the
configured objective (``objective``), which is what an Optuna sweep
(``--multirun hparams_search=diagvi_optuna``) optimises.

Under distributed training (``trainer=ddp``, ``docs/cluster.md``) every rank runs :func:`run`;
only global rank 0 writes files, logs the final metrics and talks to an Optuna study.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import time
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from diagvi import outputs
from diagvi.checkpoint import AtomicCheckpointIO, resolve_ckpt_path
from diagvi.data import (
    DataSpec,
    ModalityData,
    ModalitySetup,
    PairedDataModule,
    read_modalities,
)
from diagvi.errors import DataError
from diagvi.graph import build_guidance_graph
from diagvi.io import atomic_write
from diagvi.lit import DEFAULT_WEIGHTS, NONFINITE_ACTIONS, DiagVILightning
from diagvi.module import DiagVAE

if TYPE_CHECKING:
    import optuna

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def objective_name(cfg: DictConfig) -> str:
    """The metric named by ``cfg.objective``; ``auto``: ``val/foscttm`` for paired data, else
    ``val/label_transfer`` when both modalities have labels, else ``val/loss``."""
    name = cfg.get("objective") or "auto"
    if name == "auto":
        if cfg.data.get("paired"):
            return "val/foscttm"
        labelled = [m for m, s in cfg.data.modalities.items() if s.get("labels_key")]
        return "val/label_transfer" if len(labelled) == len(cfg.data.modalities) else "val/loss"
    if name not in outputs.OBJECTIVE_DIRECTIONS:
        raise ValueError(
            f"objective must be auto or one of {list(outputs.OBJECTIVE_DIRECTIONS)}, got {name!r}"
        )
    return name


# For the sweeper config: `direction: ${diagvi.objective_direction:}` follows `objective`.
OmegaConf.register_new_resolver(
    "diagvi.objective", lambda *, _root_: objective_name(_root_), replace=True
)
OmegaConf.register_new_resolver(
    "diagvi.objective_direction",
    lambda *, _root_: outputs.OBJECTIVE_DIRECTIONS[objective_name(_root_)],
    replace=True,
)


def _int_at_least(low: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# key: (test, what a value must be); keys absent from the config (or null, where marked) pass
_NONE_OK = ("threads",)
CONFIG_CHECKS: dict[str, tuple[Any, str]] = {
    "seed": (lambda v: _int_at_least(0)(v) and v < 2**32, "an integer in [0, 2^32)"),
    "threads": (_int_at_least(1), "a positive integer, or null for torch's default"),
    "data.batch_size": (_int_at_least(1), "a positive integer (cells per modality per minibatch)"),
    "data.num_workers": (_int_at_least(0), "a non-negative integer"),
    "model.n_latent": (_int_at_least(1), "a positive integer"),
    "model.encoder.n_hidden": (_int_at_least(1), "a positive integer"),
    "model.encoder.n_layers": (_int_at_least(0), "a non-negative integer"),
    "model.encoder.dropout": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "model.lr": (lambda v: _finite(v) and v > 0, "a positive number"),
    "model.weight_decay": (lambda v: _finite(v) and v >= 0, "a non-negative number"),
    "model.nonfinite": (lambda v: v in NONFINITE_ACTIONS, f"one of {list(NONFINITE_ACTIONS)}"),
    **{
        f"model.{k}": (lambda v: _finite(v) and v >= 0, "a non-negative number (0: term off)")
        for k in DEFAULT_WEIGHTS
    },
}


def check_config(cfg: DictConfig, keys: Iterable[str] = CONFIG_CHECKS) -> None:
    """Refuse bad values of the config ``keys`` this entry point reads, naming the key.

    Without it they fail later with an error that names no key (``data.batch_size=0``: a
    ``ZeroDivisionError``; ``seed=-5``: numpy's bounds) or, worse, train a meaningless model
    (``model.n_latent=0`` reports FOSCTTM 0, a perfect pairing). Raises
    :class:`~diagvi.errors.DataError`.
    """
    missing = object()
    for key in keys:
        value = OmegaConf.select(cfg, key, default=missing)
        if value is missing or (value is None and key in _NONE_OK):
            continue
        test, what = CONFIG_CHECKS[key]
        if not test(value):
            raise DataError(f"{key} must be {what}, got {value!r}")


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
    setups = {}
    for m in cfg.data.modalities:
        try:
            setups[m] = ModalitySetup(
                **OmegaConf.to_container(cfg.data.modalities[m]), likelihood=names[m]
            )
        except (DataError, TypeError) as err:
            # ModalitySetup names its own field; the config key is data.modalities.<m>.<field>
            message = str(err).replace("ModalitySetup.", f"data.modalities.{m}.")
            if message == str(err):
                message = f"data.modalities.{m}: {err}"
            raise type(err)(message) from err
    data, categories = read_modalities({m: adatas[m] for m in cfg.data.modalities}, setups)
    features = {m: d.var_names for m, d in data.items()}
    if cfg.data.get("mapping_path"):
        mapping = cfg.data.mapping_path
    if cfg.data.guidance == "mapping" and mapping is not None:
        on_missing = cfg.data.get("on_missing", "raise")
        graph = build_guidance_graph(features, mapping=mapping, on_missing=on_missing)
    elif cfg.data.guidance == "mapping":
        raise DataError(
            "data.guidance=mapping needs a mapping table: set data.mapping_path (a CSV with one "
            f"column per modality, {list(features)}), or data.guidance=shared_names to link "
            "features of equal names"
        )
    elif cfg.data.guidance == "shared_names":
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


def build_model(
    cfg_model: DictConfig, spec: DataSpec, data: Mapping[str, ModalityData] | None = None
) -> DiagVILightning:
    """DiagVAE from the component config groups, wrapped in the LightningModule.

    ``data``: the modalities that the guidance graph's linked view and the encoders'
    principal components (``encoder_pcs``) are fitted on (see
    :meth:`~diagvi.module.DiagVAE.fit_on_data`); without it the view standardises each
    minibatch on its own, and principal components must come from a checkpoint.
    """
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
    if data is not None:
        module.fit_on_data(data)
    weights = {k: float(cfg_model[k]) for k in DEFAULT_WEIGHTS}
    return DiagVILightning(
        module,
        weights,
        lr=cfg_model.lr,
        weight_decay=cfg_model.weight_decay,
        nonfinite=cfg_model.get("nonfinite", "raise"),
    )


# distributions whose versions a run records (provenance.json)
PROVENANCE_PACKAGES = (
    "diagvi",
    "torch",
    "lightning",
    "numpy",
    "anndata",
    "geomloss",
    "torch_geometric",
    "hydra-core",
    "optuna",
)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit(path: Path | None = None) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout holding ``path`` (default: this package), or
    None outside one."""
    path = path or Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=path, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(cfg: DictConfig, ckpt_path: str | None) -> dict[str, Any]:
    """What a run needs to be reproduced: seed, package versions, git commit, resume point."""
    git = git_commit()
    return {
        "seed": cfg.seed,
        "git_commit": git and git["commit"],
        "git_dirty": git and git["dirty"],
        "resumed_from": ckpt_path,
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PROVENANCE_PACKAGES},
    }


def _instantiate_all(group: DictConfig | None) -> list:
    return [instantiate(c) for c in (group or {}).values() if c is not None]


def open_trial(cfg: DictConfig):
    """The Optuna trial this run is, from ``cfg.optuna_trial`` (set by the sweeper), or None.

    Its pruner is built from the sweeper's config (``hydra.sweeper.pruner``): Optuna stores
    trials, not pruners.
    """
    spec = cfg.get("optuna_trial")
    if not spec:
        return None
    import optuna

    sweeper = HydraConfig.get().sweeper if HydraConfig.initialized() else {}
    pruner_cfg = sweeper.get("pruner")
    study = optuna.load_study(
        study_name=spec.study_name,
        storage=spec.storage,
        # a trial never samples here; RandomSampler keeps Trial() from fitting TPE models
        sampler=optuna.samplers.RandomSampler(),
        pruner=instantiate(pruner_cfg) if pruner_cfg else optuna.pruners.NopPruner(),
    )
    return optuna.trial.Trial(study, spec.trial_id)


class TrialCallback(L.Callback):
    """Reports the objective on the held-out cells to an Optuna trial after each validation.

    ``val/foscttm`` and ``val/label_transfer`` are computed and logged here (``val/loss`` is
    logged by the training loop). When the trial's pruner prunes it, training stops and
    ``pruned_at`` holds the epoch; :func:`run` then raises ``optuna.TrialPruned``.

    Under distributed training every rank holds this callback, but only global rank 0 holds the
    ``trial`` (``None`` elsewhere): rank 0 computes the objective and decides on pruning, and
    shares both with the other ranks, which must stop at the same epoch.

    Parameters
    ----------
    objective
        ``val/foscttm``, ``val/label_transfer`` or ``val/loss``.
    trial
        The running trial (:func:`open_trial`) on global rank 0, ``None`` on the other ranks.
    """

    def __init__(self, objective: str, trial: optuna.trial.Trial | None = None) -> None:
        self.objective, self.trial = objective, trial
        self.pruned_at: int | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: DiagVILightning) -> None:
        if self.objective == "val/loss" or trainer.sanity_checking:
            return
        # computed once, on rank 0 (every rank holds the same weights); the other ranks log 0,
        # and the sum over the ranks gives every rank rank 0's value
        value = 0.0
        if trainer.is_global_zero:
            value = outputs.heldout_metric(self.objective, pl_module.module, trainer.datamodule)
        pl_module.log(self.objective, value, sync_dist=True, reduce_fx="sum")

    def on_validation_end(self, trainer: L.Trainer, pl_module: DiagVILightning) -> None:
        # epoch-level values reach callback_metrics only after on_validation_epoch_end
        value = trainer.callback_metrics.get(self.objective)
        if trainer.sanity_checking or value is None:
            return
        prune = False
        if self.trial is not None:
            self.trial.report(float(value), step=trainer.current_epoch)
            prune = self.trial.should_prune()
        if trainer.strategy.broadcast(prune, src=0):
            self.pruned_at = trainer.current_epoch
            trainer.should_stop = True


def check_not_relaunched_in_sweep(trainer: L.Trainer) -> None:
    """Refuse a multi-process trainer that would start its own processes inside a sweep.

    Lightning starts the extra ranks of ``strategy=ddp`` by running the command line again,
    which inside ``--multirun`` would start the whole sweep again in every rank. Processes made
    by the cluster (SLURM tasks: ``hydra/launcher=slurm``; ``torchrun``) are fine.
    """
    in_sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if (
        in_sweep
        and trainer.world_size > 1
        and not trainer.strategy.cluster_environment.creates_processes_externally
    ):
        raise ValueError(
            f"a sweep trial cannot start its own {trainer.world_size} training processes "
            "(Lightning would run the sweep's command line again in each); run the sweep "
            "with hydra/launcher=slurm (one SLURM task per device) or with one device per "
            "trial (trainer=default or trainer=gpu); see docs/cluster.md"
        )


def _log_final(loggers: list, metrics: dict[str, Any], step: int) -> None:
    """Final metrics to every logger (W&B: also the summary) and the embedding PNG to W&B."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    for lg in loggers:
        lg.log_metrics(numbers, step=step)
        if isinstance(lg, WandbLogger) and "embedding_png" in metrics:
            lg.log_image("embedding", [metrics["embedding_png"]], step=step)
        lg.save()


def _finish_wandb(loggers: list, status: str) -> None:
    """Finish a started W&B run, marked failed (exit code 1) unless it finished or was pruned.

    Also on errors, so that the next run in this process (the next sweep trial) is clean.
    """
    started = [lg for lg in loggers if isinstance(lg, WandbLogger) and lg._experiment is not None]
    if started:
        import wandb

        started[0].experiment.summary["status"] = status
        wandb.finish(exit_code=0 if status in ("finished", "pruned") else 1)


def check_monitors(callbacks: list, dm: PairedDataModule) -> None:
    """Refuse, before training, early stopping on validation metrics that no cell will give
    (Lightning would stop the run with an error at the end of the first epoch)."""
    if dm.has_validation:
        return
    for cb in callbacks:
        if isinstance(cb, EarlyStopping) and cb.monitor.startswith("val/"):
            raise DataError(
                f"early stopping monitors {cb.monitor!r}, but no cells are held out for "
                "validation (data.val_fraction=0): set data.val_fraction > 0, or "
                "callbacks=no_early_stopping, or callbacks.early_stopping.monitor=train/loss"
            )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one model as configured and write its outputs; returns the run's metrics.

    ``provenance.json`` (seed, package versions, git commit, the checkpoint resumed from) is
    written first. ``ckpt_path``: ``last`` (this run dir's ``checkpoints/last.ckpt``), a run
    directory, or a checkpoint file. Checkpoints are written atomically.

    Under distributed training every rank trains, and global rank 0 alone writes the outputs,
    logs the final metrics and reports to an Optuna trial; the other ranks return the metrics
    they hold after training (their own share of the validation data).

    Raises ``FloatingPointError`` when the objective is not finite (a diverged run) and, in a
    sweep, ``optuna.TrialPruned`` after writing the outputs of a pruned trial.
    """
    check_config(cfg, ("seed", "threads"))  # the rest once a logger can show the config
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.get("run_dir") or HydraConfig.get().runtime.output_dir)
    objective = objective_name(cfg)
    loggers = _instantiate_all(cfg.get("logger"))
    callbacks = _instantiate_all(cfg.get("callbacks"))
    # in a sweep every rank holds it (it shares rank 0's objective and pruning decision)
    trial_callback = TrialCallback(objective) if cfg.get("optuna_trial") else None
    if trial_callback is not None:
        callbacks.append(trial_callback)
    # the trainer first: it knows this process's rank, and only rank 0 writes
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )
    check_not_relaunched_in_sweep(trainer)
    writer = trainer.is_global_zero
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    if writer:
        atomic_write(
            run_dir / "provenance.json",
            lambda tmp: Path(tmp).write_text(json.dumps(provenance(cfg, ckpt_path), indent=2)),
        )
    status = "failed"
    try:
        # the config first: a run that fails while building data or model still shows it
        # (loggers write on rank 0 only)
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        check_config(cfg)
        dm, spec, adatas = build_datamodule(cfg)
        check_monitors(callbacks, dm)
        # the objective is computed after training (and, in a sweep, every epoch): its
        # preconditions are checked now, not after the run's time is spent
        if trial_callback is not None or (objective != "val/loss" and dm.has_validation):
            outputs.check_heldout(objective, dm)
        lit = build_model(cfg.model, spec, dm.data)
        trial = open_trial(cfg) if writer else None
        if trial_callback is not None:
            trial_callback.trial = trial
        start = time.perf_counter()
        trainer.fit(lit, datamodule=dm, ckpt_path=ckpt_path)
        seconds = time.perf_counter() - start
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        metrics.update(epochs=trainer.current_epoch, train_seconds=seconds)
        if not writer:
            status = "finished"
            return metrics
        held_out = dm.has_validation
        if objective != "val/loss" and (held_out or trial is not None):
            metrics[objective] = outputs.heldout_metric(objective, lit.module, dm)
        if cfg.get("write_outputs", True):
            metrics.update(
                outputs.write_run_outputs(
                    lit.module, dm.data, adatas, run_dir, paired=cfg.data.paired
                )
            )
        pruned_at = trial_callback.pruned_at if trial_callback is not None else None
        if pruned_at is not None:
            metrics["pruned_at_epoch"] = pruned_at
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        _log_final(loggers, metrics, trainer.global_step)
        value = metrics.get(objective)
        if value is None and trial is not None:
            raise DataError(f"no {objective} to optimise: set data.val_fraction > 0")
        if value is not None and not math.isfinite(value):
            raise FloatingPointError(f"objective {objective} is {value}: training diverged")
        if pruned_at is not None:
            import optuna

            status = "pruned"
            raise optuna.TrialPruned(f"pruned after epoch {pruned_at}")
        status = "finished"
    finally:
        _finish_wandb(loggers, status)
    summary = f"diagvi: trained {metrics['epochs']} epochs in {metrics['train_seconds']:.0f} s"
    if "foscttm" in metrics:
        summary += f"; FOSCTTM {metrics['foscttm']:.3f} (0 = perfect pairing, 0.5 = random)"
    if objective in metrics:
        summary += f"; objective {objective} {metrics[objective]:.4g} (held-out cells)"
    print(f"{summary}\ndiagvi: outputs in {run_dir}")
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Console entry point; returns the objective (see ``objective`` in configs/train.yaml)."""
    return run(cfg).get(objective_name(cfg))


if __name__ == "__main__":
    main()
