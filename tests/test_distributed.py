"""Training on more than one process and sweeps on more than one machine (docs/cluster.md).

``trainer=ddp`` with two CPU ranks (gloo) runs as a ``python -m diagvi.train`` subprocess, as
an Optuna trial whose pruner stops it after its second epoch (as a DDP trial of a SLURM sweep
runs); a sweep runs its trials in parallel with the joblib launcher. Both start together in one
fixture. Probes (``tests/probes.py``, added through ``+callbacks...``) record what each process
saw.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import anndata as ad
import lightning as L
import numpy as np
import optuna
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from diagvi.train import check_not_relaunched_in_sweep
from hydra_plugins.diagvi_optuna_sweeper.sweeper import format_value

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
# 108 training cells per modality in minibatches of 27: 4 per epoch, 2 for each of 2 ranks
TINY = [
    "data=synthetic",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "data.load.n_cells=120",
    "data.load.n_genes=30",
    "data.load.n_proteins=8",
    "data.batch_size=27",
    "model.n_latent=4",
    "model.encoder.n_hidden=16",
]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def has_plugin(name: str) -> bool:
    return importlib.util.find_spec(f"hydra_plugins.{name}") is not None


def start(cwd: Path, overrides: list[str]) -> subprocess.Popen:
    """``python -m diagvi.train`` in ``cwd`` (its outputs go below it), probes importable."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        # the DDP ranks and the joblib workers share 2 cores: one thread each
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.getenv("PYTHONPATH")])),
    }
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(
        [sys.executable, "-m", "diagvi.train", *overrides],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # its own process group: a stuck run is killed with the ranks it started
        start_new_session=True,
    )


def stop(proc: subprocess.Popen) -> str:
    os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate()[0]


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    """Wait for ``proc`` (and the ranks it started); returns its exit code and output."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"diagvi.train timed out:\n{stop(proc)[-3000:]}")
    return proc.returncode, out


def new_trial(storage: str, study_name: str) -> str:
    """The ``optuna_trial`` override of a new trial of a new study, as the sweeper gives it."""
    trial = optuna.create_study(study_name=study_name, storage=storage).ask()
    spec = {
        "study_name": study_name,
        "storage": storage,
        "trial_id": trial._trial_id,
        "number": trial.number,
        "name": f"trial_{trial.number}",
    }
    return "optuna_trial={" + ",".join(f"{k}:{format_value(v)}" for k, v in spec.items()) + "}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-rank DDP run and a 2-trial sweep with trials in parallel, started together."""
    base = tmp_path_factory.mktemp("distributed")
    ddp_run = [
        *TINY,
        *DDP,
        "callbacks=default",
        "trainer.max_epochs=3",
        "+callbacks.seen._target_=probes.SeenCells",
        f"+callbacks.seen.folder={base / 'ddp_seen'}",
        # a trial outside a sweep: the sweeper's config only gives the pruner, which prunes
        # at the second validation (any FOSCTTM > 0)
        new_trial(f"sqlite:///{base / 'ddp_study.db'}", "ddp"),
        "hydra/sweeper=diagvi_optuna",
        "hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,upper:0.0,n_warmup_steps:1}",
    ]
    # no hydra.run.dir: the second rank must find the first rank's timestamped run dir
    procs = {"ddp": start(base / "ddp", ddp_run)}
    if has_plugin("hydra_joblib_launcher"):
        rendezvous = base / "rendezvous"
        sweep = [
            "--multirun",
            "hparams_search=diagvi_optuna",
            *TINY,
            "trainer.max_epochs=2",
            "callbacks=none",
            "hydra/launcher=local_parallel",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",
            f"hydra.sweep.dir={base / 'sweep'}",
            "+callbacks.meet._target_=probes.Rendezvous",
            f"+callbacks.meet.folder={rendezvous}",
            "+callbacks.meet.parties=2",
        ]
        procs["parallel_sweep"] = start(base / "parallel_sweep", sweep)
    yield base, procs
    for proc in procs.values():
        if proc.poll() is None:
            stop(proc)


# ----------------------------------------------------------------------------- DDP


@pytest.fixture(scope="module")
def ddp(runs):
    """The DDP run's output, its run dirs, each rank's probe record and its Optuna trial."""
    base, procs = runs
    rc, out = finish(procs["ddp"])
    # a pruned trial writes its outputs, then raises optuna.TrialPruned (the sweeper records it)
    assert rc != 0 and "TrialPruned: pruned after epoch 1" in out, out[-4000:]
    run_dirs = sorted((base / "ddp" / "outputs" / "train").iterdir())
    ranks = [json.loads((base / "ddp_seen" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    storage = f"sqlite:///{base / 'ddp_study.db'}"
    (trial,) = optuna.load_study(study_name="ddp", storage=storage).trials
    return out, run_dirs, ranks, trial


def test_ddp_ranks_see_disjoint_cells(ddp):
    _, _, ranks, _ = ddp
    assert [r["global_rank"] for r in ranks] == [0, 1]
    assert {r["world_size"] for r in ranks} == {2}
    assert {r["backend"] for r in ranks} == {"gloo"}  # Lightning's choice on CPU
    assert ranks[0]["train_idx"] == ranks[1]["train_idx"]  # the same split on every rank
    train_idx = ranks[0]["train_idx"]
    for epoch in ("0", "1"):
        for m, idx in train_idx.items():
            a, b = (set(r["seen"][epoch][m]) for r in ranks)
            assert not a & b, f"epoch {epoch}, {m}: both ranks saw cells {sorted(a & b)[:5]}"
            # together the ranks walk the modality's training cells once per epoch
            assert a | b == set(idx), (epoch, m)
            assert len(a) == len(b) == len(idx) // 2
    # each rank made half of the 4 optimizer steps of each of the 2 epochs before the pruning
    assert {r["global_step"] for r in ranks} == {4}


def test_ddp_trial_reports_once_and_all_ranks_stop_together(ddp):
    _, run_dirs, ranks, trial = ddp
    # rank 0 reported after each validation: epochs 0 and 1, then pruned
    assert sorted(trial.intermediate_values) == [0, 1]
    metrics = json.loads((run_dirs[0] / "metrics.json").read_text())
    assert (metrics["pruned_at_epoch"], metrics["epochs"]) == (1, 2)
    assert trial.intermediate_values[1] == pytest.approx(metrics["val/foscttm"])
    assert sorted(ranks[1]["seen"]) == ["0", "1"]  # rank 1 stopped with rank 0 (no hang)


def test_ddp_writes_outputs_once(ddp):
    out, run_dirs, _, _ = ddp
    assert len(run_dirs) == 1, run_dirs  # both ranks used the first rank's run dir
    (run_dir,) = run_dirs
    # only rank 0 went on after training to the outputs and the trial's end (TrialPruned)
    assert out.count("TrialPruned: pruned after epoch 1") == 1, out[-3000:]
    names = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    expected = {
        "config.yaml",
        "provenance.json",
        "metrics.json",
        "embedding.png",
        "latent_rna.h5ad",
        "latent_protein.h5ad",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
    }
    assert expected <= names, sorted(names)
    assert not [n for n in names if ".tmp" in n], sorted(names)  # no write left half-done
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 2  # pruned after the second epoch
    assert math.isfinite(metrics["val/foscttm"]) and 0.0 <= metrics["val/foscttm"] <= 1.0
    for m in ("rna", "protein"):
        z = ad.read_h5ad(run_dir / f"latent_{m}.h5ad").obsm["X_diagvi"]
        assert z.shape == (120, 4) and np.isfinite(z).all()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4 and ckpt["epoch"] == 1
    assert json.loads((run_dir / "provenance.json").read_text())["seed"] == 0


# ----------------------------------------------------------------------------- sweeps


def test_joblib_launcher_runs_trials_in_parallel(runs):
    if not has_plugin("hydra_joblib_launcher"):
        pytest.skip("hydra-joblib-launcher is not installed (pip install -e '.[dev]')")
    base, procs = runs
    rc, out = finish(procs["parallel_sweep"])
    assert rc == 0, out[-4000:]
    storage = f"sqlite:///{base / 'sweep' / 'optuna.db'}"
    trials = optuna.load_study(study_name="diagvi_synthetic", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    met = [json.loads(p.read_text()) for p in (base / "rendezvous").glob("met_*.json")]
    # each trial waited at the start of training until the other one was there too
    assert len(met) == 2 and all(r["met"] for r in met), met
    assert met[0]["pid"] != met[1]["pid"]


# ----------------------------------------------------------------------------- configs


@pytest.fixture
def compose_hydra(tmp_path):
    """``compose_hydra(overrides, mode)``: the train config with its hydra node, as
    ``@hydra.main`` would set it (run dir filled in, mode set)."""

    def make(overrides: list[str], mode: RunMode = RunMode.RUN):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path)
            cfg.hydra.mode = mode
        HydraConfig.instance().set_config(cfg)
        return cfg

    return make


def test_trainer_ddp_config(compose_hydra):
    cfg = compose_hydra(["data=synthetic", "logger=none", "callbacks=none", *DDP])
    assert cfg.trainer.strategy == "ddp"
    assert cfg.trainer.use_distributed_sampler is False  # PairedSampler shards the batches
    trainer = instantiate(cfg.trainer, logger=False)
    assert (trainer.world_size, trainer.num_nodes) == (2, 1)
    assert trainer.strategy.__class__.__name__ == "DDPStrategy"


def test_trainer_gpu_config(compose_hydra):
    cfg = compose_hydra(["data=synthetic", "logger=none", "callbacks=none", "trainer=gpu"])
    assert (cfg.trainer.accelerator, cfg.trainer.devices) == ("gpu", 1)
    assert cfg.trainer.precision == "bf16-mixed"
    if not torch.cuda.is_available():
        pytest.skip("no GPU: trainer=gpu composes, but a Trainer cannot be built here")
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.precision == "bf16-mixed"


@pytest.mark.parametrize(
    ("launcher", "plugin"),
    [("slurm", "hydra_submitit_launcher"), ("local_parallel", "hydra_joblib_launcher")],
)
def test_launcher_configs_compose(compose_hydra, launcher, plugin):
    if not has_plugin(plugin):
        pytest.skip(f"{plugin} is not installed (pip install -e '.[cluster]')")
    search = ["hparams_search=diagvi_optuna", "data=synthetic", "hydra.sweeper.n_jobs=3"]
    cfg = compose_hydra([*search, f"hydra/launcher={launcher}"])
    node = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    if launcher == "slurm":
        assert node["_target_"].endswith("SlurmLauncher")
        assert node["tasks_per_node"] == node["gpus_per_node"] == 1
        assert node["nodes"] == 1  # trainer.num_nodes, 1 where the trainer has none
        cfg = compose_hydra([*search, "hydra/launcher=slurm", *DDP, "trainer.num_nodes=2"])
        assert OmegaConf.to_container(cfg.hydra.launcher, resolve=True)["nodes"] == 2
    else:
        assert node["_target_"].endswith("JoblibLauncher")
        assert node["n_jobs"] == 3  # as many processes as trials handed over at once


def test_ddp_inside_a_sweep_is_refused(compose_hydra):
    overrides = ["data=synthetic", "logger=none", "callbacks=none", *DDP]
    trainer = instantiate(compose_hydra(overrides).trainer, logger=False)
    check_not_relaunched_in_sweep(trainer)  # a single run may start its ranks
    compose_hydra(overrides, RunMode.MULTIRUN)
    with pytest.raises(ValueError, match="hydra/launcher=slurm"):
        check_not_relaunched_in_sweep(trainer)
    check_not_relaunched_in_sweep(L.Trainer(logger=False, accelerator="cpu", devices=1))
