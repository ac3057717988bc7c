"""Tests for Optuna sweeps (``python -m diagvi.train --multirun hparams_search=...``), the
``diagvi_optuna`` sweeper plugin and ``python -m diagvi.report``.

The sweeps are subprocesses on a tiny synthetic pair (2 epochs), started together by one
fixture; each test waits only for the sweeps it checks. W&B runs offline where a test reads
what it logged, and is off elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from diagvi import outputs
from diagvi.errors import DataError
from diagvi.report import write_report
from diagvi.train import build_datamodule, build_model, objective_name
from hydra_plugins.diagvi_optuna_sweeper.sweeper import format_value, search_space

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
STUDY = "diagvi_synthetic"  # the default study name with data=synthetic
TINY = [
    "data=synthetic",
    "data.load.n_cells=120",
    "data.load.n_genes=30",
    "data.load.n_proteins=8",
    "data.batch_size=64",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "callbacks=none",
]
SEARCH = ["--multirun", "hparams_search=diagvi_optuna", *TINY]


class Sweep:
    """One ``python -m diagvi.train --multirun ...`` subprocess writing into ``sweep_dir``."""

    def __init__(self, cwd: Path, sweep_dir: Path, overrides: list[str], wandb: str) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        self.sweep_dir = sweep_dir
        env = {
            **os.environ,
            "WANDB_MODE": wandb,
            "WANDB_SILENT": "true",
            "WANDB_CONFIG_DIR": str(cwd / "wandb_config"),
            "WANDB_CACHE_DIR": str(cwd / "wandb_cache"),
            "WANDB_DATA_DIR": str(cwd / "wandb_data"),
            # several sweeps share 2 cores: one thread each
            "OMP_NUM_THREADS": "1",
        }
        env.pop("HYDRA_FULL_ERROR", None)
        cmd = [sys.executable, "-m", "diagvi.train", *overrides, f"hydra.sweep.dir={sweep_dir}"]
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._output: str | None = None

    def wait(self, timeout: float = 300, ok: bool = True) -> str:
        """Wait for the sweep; fails the test unless it exited 0 (``ok=False``: unless it
        failed). Returns its output."""
        if self._output is None:
            try:
                self._output, _ = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self._output, _ = self.proc.communicate()
        assert (self.proc.returncode == 0) == ok, self._output[-4000:]
        return self._output


def load_trials(sweep_dir: Path, study_name: str = STUDY) -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{sweep_dir}/optuna.db"
    return optuna.load_study(study_name=study_name, storage=storage).trials


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """Start every sweep at once; tests wait for the ones they check."""
    base = tmp_path_factory.mktemp("sweeps")
    shared = base / "shared"
    worker = [*SEARCH, "logger=none", "hydra.sweeper.n_trials=2"]
    failing = [
        "--multirun",
        "hparams_search=diagvi_grid",
        *TINY,
        # fix the grid's parameters but one: dropout 1.5 fails (nn.Dropout refuses it)
        "model.lam_sinkhorn=85",
        "model.alignment.p=2",
        "model.n_latent=10",
        "model.encoder.dropout=choice(0.1,1.5)",
        # prunes every trial at its first validation (minimise, any value > 0)
        "hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,upper:0.0}",
    ]
    runs = {
        "main": Sweep(
            base / "main", base / "main" / "sweep", [*SEARCH, "hydra.sweeper.n_trials=3"], "offline"
        ),
        "failing": Sweep(base / "failing", base / "failing" / "sweep", failing, "offline"),
        "worker_a": Sweep(base / "worker_a", shared, worker, "disabled"),
        "worker_b": Sweep(base / "worker_b", shared, worker, "disabled"),
        # the default search space names the unbalanced alignment's reach_scale
        "balanced": Sweep(
            base / "balanced",
            base / "balanced" / "sweep",
            [*SEARCH, "logger=none", "hydra.sweeper.n_trials=1", "model/alignment=sinkhorn"],
            "disabled",
        ),
    }
    yield runs
    for run in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.communicate()


# ----------------------------------------------------------------------------- end to end


def test_sweep_runs_trials_with_wandb_runs(sweeps):
    run = sweeps["main"]
    run.wait()
    trials = load_trials(run.sweep_dir)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    for t in trials:
        trial_dir = run.sweep_dir / f"trial_{t.number}"
        metrics = json.loads((trial_dir / "metrics.json").read_text())
        assert t.value == pytest.approx(metrics["val/foscttm"])  # the objective (paired data)
        assert 0.0 <= t.value <= 1.0
        assert t.intermediate_values, "no intermediate values reported"
        assert set(t.params) >= {"model.lam_sinkhorn", "model.lam_class", "model.lr"}
        config = OmegaConf.load(trial_dir / "config.yaml")
        assert config.model.lam_sinkhorn == pytest.approx(t.params["model.lam_sinkhorn"])
        (offline,) = (trial_dir / "wandb").glob("offline-run-*")
        (log,) = offline.glob("run-*.wandb")
        logged = log.read_bytes()
        # metrics, loss terms, the group, the embedding PNG and the full config were logged
        for key in (b"val/foscttm", b"val/align", STUDY.encode(), b"embedding", b"n_proteins"):
            assert key in logged, key
        assert "got exitcode: 0" in (offline / "logs" / "debug.log").read_text()


def test_importing_the_report_keeps_the_users_backend():
    # it switched matplotlib to Agg at import: figures stopped showing in a notebook that
    # read a study with it
    import importlib

    import matplotlib

    import diagvi.report

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        importlib.reload(diagvi.report)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_report_lists_trials_and_best_experiment(sweeps, tmp_path):
    import matplotlib.pyplot as plt

    run = sweeps["main"]
    run.wait()
    open_before = plt.get_fignums()
    out = write_report(run.sweep_dir)
    assert plt.get_fignums() == open_before  # files only: no pyplot figures left open
    table = pd.read_csv(out["csv"])
    assert len(table) == 3
    assert list(table["val/foscttm"]) == sorted(table["val/foscttm"])  # best (lowest) first
    assert (out["md"].read_text().count("| COMPLETE |")) == 3
    for key in ("history", "objective_vs_model.lr", "objective_vs_model.n_latent"):
        assert out[key].read_bytes()[:4] == b"\x89PNG", key
    # the best experiment is usable as configs/experiment/<name>.yaml
    configs = shutil.copytree(CONFIG_DIR, tmp_path / "configs")
    shutil.copy(out["best"], configs / "experiment" / "best.yaml")
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=best", "data=synthetic"])
    best = table.iloc[0]
    for key in ("model.lam_sinkhorn", "model.lr", "model.alignment.reach_scale"):
        assert OmegaConf.select(cfg, key) == pytest.approx(best[key]), key
    assert cfg.model.n_latent == best["model.n_latent"]


def test_rerun_resumes_the_study(sweeps):
    first = sweeps["main"]
    first.wait()
    before = len(load_trials(first.sweep_dir))
    again = Sweep(
        first.sweep_dir.parent / "again",
        first.sweep_dir,
        # still drawing start-up trials, the ones a same-seeded sampler would repeat
        [
            *SEARCH,
            "logger=none",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=9",
        ],
        "disabled",
    )
    again.wait()
    trials = load_trials(first.sweep_dir)
    assert [t.number for t in trials] == list(range(before + 2))
    # the seeded sampler moves on: the new trials are not the first run's start-up ones again
    earlier = [t.params for t in trials[:before]]
    assert all(t.params not in earlier for t in trials[before:])
    storage = f"sqlite:///{first.sweep_dir}/optuna.db"
    assert optuna.study.get_all_study_names(storage) == [STUDY]


def test_resuming_a_study_with_another_objective_is_refused(sweeps):
    first = sweeps["main"]
    first.wait()
    other = Sweep(
        first.sweep_dir.parent / "other_objective",
        first.sweep_dir,
        [*SEARCH, "logger=none", "hydra.sweeper.n_trials=1", "objective=val/loss"],
        "disabled",
    )
    output = other.wait(ok=False)
    assert "optimises 'val/foscttm', not 'val/loss'" in output
    assert "choose another hydra.sweeper.study_name" in output


def test_search_space_keys_the_config_lacks_are_not_searched(sweeps):
    run = sweeps["balanced"]
    output = run.wait()
    assert "not searched, the config has no such keys: model.alignment.reach_scale" in output
    (trial,) = load_trials(run.sweep_dir)
    assert trial.state.name == "COMPLETE" and "model.alignment.reach_scale" not in trial.params
    assert "model.alignment.epsilon_scale" in trial.params


def test_failed_trial_is_recorded_and_study_goes_on(sweeps):
    run = sweeps["failing"]
    output = run.wait()
    trials = load_trials(run.sweep_dir, "diagvi_grid_synthetic")
    by_state = {t.state.name: t for t in trials}
    assert sorted(by_state) == ["FAIL", "PRUNED"], output[-3000:]
    failed, pruned = by_state["FAIL"], by_state["PRUNED"]
    assert failed.params["model.encoder.dropout"] == 1.5
    assert "dropout" in failed.user_attrs["error"]
    # the failed trial's W&B run was finished and marked failed
    (offline,) = (run.sweep_dir / f"trial_{failed.number}" / "wandb").glob("offline-run-*")
    assert "got exitcode: 1" in (offline / "logs" / "debug.log").read_text()
    # the pruned trial stopped after its first validation and wrote its outputs
    metrics = json.loads((run.sweep_dir / f"trial_{pruned.number}" / "metrics.json").read_text())
    assert metrics["pruned_at_epoch"] == 0 and metrics["epochs"] == 1
    assert pruned.value == pytest.approx(metrics["val/foscttm"])


def test_two_workers_share_one_storage(sweeps):
    a, b = sweeps["worker_a"], sweeps["worker_b"]
    a.wait()
    b.wait()
    trials = load_trials(a.sweep_dir)
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert {t.state.name for t in trials} == {"COMPLETE"}
    assert sorted(p.name for p in a.sweep_dir.glob("trial_*")) == [f"trial_{i}" for i in range(4)]


# ----------------------------------------------------------------------------- units


def test_search_space_from_params_and_command_line():
    params = {
        "model.lr": "tag(log, interval(1e-4, 1e-2))",
        "model.n_latent": "choice(8, 16)",
        "model.lam_kl": "tag(log, interval(0.1, 10))",
        "trainer.max_epochs": 5,
    }
    cli = ["model.lam_kl=2.0", "model.encoder.n_layers=range(1,4)", "data=synthetic"]
    fixed, space = search_space(params, cli)
    assert space["model.lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert space["model.n_latent"] == CategoricalDistribution([8, 16])
    assert space["model.encoder.n_layers"] == IntDistribution(1, 3)  # range() excludes its stop
    assert "model.lam_kl" not in space  # fixed on the command line
    assert sorted(fixed) == ["data=synthetic", "model.lam_kl=2.0", "trainer.max_epochs=5"]
    with pytest.raises(ValueError, match="unknown tags"):
        search_space({"model.lr": "tag(loq, interval(1, 2))"}, [])


@pytest.mark.parametrize("value", [0.001, 1e-05, 3, True, None, "uot", "a b", "1", "x'y"])
def test_format_value_round_trips(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_override(f"k={format_value(value)}").value()
    assert parsed == value and type(parsed) is type(value)


@pytest.fixture
def compose_search():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield lambda overrides: compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("search", ["diagvi_optuna", "diagvi_grid"])
def test_objective_sets_the_direction(compose_search, search):
    cfg = compose_search([f"hparams_search={search}", "data=synthetic"])
    assert cfg.hydra.sweeper.metric_name == "val/foscttm"  # paired data
    assert cfg.hydra.sweeper.direction == "minimize"
    assert cfg.hydra.sweeper.study_name.endswith("synthetic")
    unpaired = [f"hparams_search={search}", "data=synthetic", "data.paired=false"]
    cfg = compose_search([*unpaired, "data.modalities.protein.labels_key=cell_type"])
    assert (cfg.hydra.sweeper.metric_name, cfg.hydra.sweeper.direction) == (
        "val/label_transfer",
        "maximize",
    )
    cfg = compose_search(unpaired)  # labels in rna only: nothing to score a transfer on
    assert (cfg.hydra.sweeper.metric_name, cfg.hydra.sweeper.direction) == ("val/loss", "minimize")
    with pytest.raises(ValueError, match="objective must be"):
        objective_name(compose_search([*unpaired, "objective=bogus"]))


def test_heldout_objectives(compose_search):
    cfg = compose_search([*TINY, "logger=none", "data.modalities.protein.labels_key=cell_type"])
    dm, spec, _ = build_datamodule(cfg)
    module = build_model(cfg.model, spec).module
    accuracy = outputs.heldout_metric("val/label_transfer", module, dm)
    assert 0.0 <= accuracy <= 1.0
    assert 0.0 <= outputs.heldout_metric("val/foscttm", module, dm) <= 1.0
    with pytest.raises(ValueError, match="no held-out metric"):
        outputs.heldout_metric("val/loss", module, dm)


def test_objectives_the_held_out_cells_cannot_give_are_refused_before_training(compose_search):
    cfg = compose_search([*TINY, "logger=none", "data.modalities.protein.labels_key=cell_type"])
    dm, _, _ = build_datamodule(cfg)
    for name in ("val/foscttm", "val/label_transfer", "val/loss"):
        outputs.check_heldout(name, dm)  # paired, labelled on both sides: every objective
    dm.data["protein"] = dataclasses.replace(
        dm.data["protein"], obs_names=dm.data["protein"].obs_names + "_p"
    )
    with pytest.raises(DataError, match="val/foscttm needs at least 2 held-out cells"):
        outputs.check_heldout("val/foscttm", dm)
    dm.data["protein"].labels[:] = -1
    with pytest.raises(DataError, match="val/label_transfer needs labels"):
        outputs.check_heldout("val/label_transfer", dm)
    dm.val_idx["protein"] = dm.val_idx["protein"][:0]
    with pytest.raises(DataError, match="no val/loss to optimise"):
        outputs.check_heldout("val/loss", dm)
