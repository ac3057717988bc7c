"""Tests for the Hydra configs: every option composes and instantiates, the config folders
agree with the registries, and ``python -m diagvi.train`` runs end to end.

The end-to-end runs are subprocesses started together by one fixture (they overlap with each
other on a small CPU); each test waits only for its own run.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import lightning as L
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import OmegaConf, open_dict

import diagvi  # noqa: F401  (fills the registries)
from diagvi.components.likelihoods import Likelihood
from diagvi.data import DataSpec, ModalitySpec
from diagvi.errors import DataError
from diagvi.graph import build_guidance_graph
from diagvi.lit import DEFAULT_WEIGHTS, DiagVILightning
from diagvi.registry import ALIGNMENTS, CLASSIFIERS, GRAPH_ENCODERS, LIKELIHOODS, PRIORS
from diagvi.synthetic import make_synthetic_pair
from diagvi.train import build_datamodule, build_model, likelihood_names

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
# every "group/option" pair under configs/, discovered rather than listed; configs/hydra/ holds
# options of Hydra's own groups (launchers of optional plugins), checked in test_distributed.py
GROUP_OPTIONS = sorted(
    (p.parent.relative_to(CONFIG_DIR).as_posix(), p.stem)
    for p in CONFIG_DIR.rglob("*.yaml")
    if p.parent != CONFIG_DIR and p.relative_to(CONFIG_DIR).parts[0] != "hydra"
)
REGISTRY_OF_GROUP = {
    "model/likelihood": LIKELIHOODS,
    "model/prior": PRIORS,
    "model/graph_encoder": GRAPH_ENCODERS,
    "model/alignment": ALIGNMENTS,
    "model/classifier": CLASSIFIERS,
}
FACTORY_GROUPS = {"model/likelihood", "model/prior", "model/graph_encoder", "model/classifier"}
# keep in-process composition light: no logger or callbacks unless the test is about them
BASE = ["data=synthetic", "logger=none", "callbacks=none"]


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def compose_cfg(tmp_path, monkeypatch):
    """``compose_cfg(overrides)``: the composed train config, with ``${hydra:...}`` resolvable.

    As in lightning-hydra-template's tests: compose with the hydra node, fill in the run's
    output dir and register the config with ``HydraConfig`` (``@hydra.main`` would do both).
    """
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))

    def make(overrides: list[str]):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path)
        HydraConfig.instance().set_config(cfg)
        return cfg

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield make
    HydraConfig.instance().cfg = None


@pytest.fixture(scope="module")
def small_data():
    """A small synthetic pair, its guidance graph and a DataSpec (labels in rna)."""
    adatas, mapping = make_synthetic_pair(n_cells=40, n_genes=20, n_proteins=6, seed=1)
    graph = build_guidance_graph({m: a.var_names for m, a in adatas.items()}, mapping=mapping)
    spec = DataSpec(
        modalities={m: ModalitySpec(a.n_vars, 1, "nb") for m, a in adatas.items()},
        label_categories=("a", "b", "c"),
        graph=graph,
    )
    return adatas, graph, spec


def option_override(group: str, option: str) -> str:
    if group == "model/likelihood":
        return f"model/likelihood@model.likelihood.protein={option}"
    return f"{group}={option}"


# ----------------------------------------------------------------------------- end to end


class Run:
    """One ``python -m diagvi.train`` subprocess in its own directory."""

    def __init__(self, base: Path, name: str, overrides: list[str], wandb_mode: str) -> None:
        self.cwd = base / name
        self.run_dir = self.cwd / "run"
        self.cwd.mkdir(parents=True)
        env = {
            **os.environ,
            "WANDB_MODE": wandb_mode,
            "WANDB_SILENT": "true",
            "WANDB_CONFIG_DIR": str(self.cwd / "wandb_config"),
            "WANDB_CACHE_DIR": str(self.cwd / "wandb_cache"),
            "WANDB_DATA_DIR": str(self.cwd / "wandb_data"),
        }
        env.pop("HYDRA_FULL_ERROR", None)
        cmd = [sys.executable, "-m", "diagvi.train", *overrides, f"hydra.run.dir={self.run_dir}"]
        self.proc = subprocess.Popen(
            cmd, cwd=self.cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._output: str | None = None

    def wait(self, timeout: float = 240) -> tuple[int, str]:
        if self._output is None:
            try:
                self._output, _ = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self._output, _ = self.proc.communicate()
                pytest.fail(f"diagvi.train timed out after {timeout}s:\n{self._output[-3000:]}")
        return self.proc.returncode, self._output


FAST = ["trainer.enable_progress_bar=false"]
RUNS = {
    # fast_dev_run is not a key of configs/trainer/default.yaml: `++` adds or overrides it
    "fast_dev_run": (
        ["data=synthetic", "logger=none", "++trainer.fast_dev_run=true", *FAST],
        "disabled",
    ),
    "csv": (
        ["data=synthetic", "logger=csv", "trainer.max_epochs=2", "trainer.accelerator=cpu", *FAST],
        "disabled",
    ),
    "wandb": (
        [
            "data=synthetic",
            "logger=wandb",
            "trainer.max_epochs=1",
            "trainer.accelerator=cpu",
            *FAST,
        ],
        "offline",
    ),
    "no_validation_cells": (
        ["data=synthetic", "logger=none", "data.val_fraction=0", "trainer.max_epochs=2", *FAST],
        "disabled",
    ),
    "bogus_likelihood": (
        ["data=synthetic", "logger=none", "model/likelihood@model.likelihood.protein=bogus"],
        "disabled",
    ),
}


@pytest.fixture(scope="module")
def e2e_runs(tmp_path_factory):
    """Start every end-to-end run at once; tests wait for the one they check."""
    base = tmp_path_factory.mktemp("e2e")
    runs = {name: Run(base, name, overrides, mode) for name, (overrides, mode) in RUNS.items()}
    yield runs
    for run in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.communicate()


def assert_ok(run: Run) -> str:
    rc, out = run.wait()
    assert rc == 0, out[-4000:]
    return out


def test_train_fast_dev_run(e2e_runs):
    run = e2e_runs["fast_dev_run"]
    assert_ok(run)
    assert (run.run_dir / "config.yaml").is_file()
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1
    assert math.isfinite(metrics["train/loss"])


def test_train_csv_writes_outputs(e2e_runs):
    run = e2e_runs["csv"]
    assert_ok(run)
    out = run.run_dir
    cfg = OmegaConf.load(out / "config.yaml")
    assert cfg.data.load._target_ == "diagvi.synthetic.make_synthetic_pair"
    assert cfg.trainer.default_root_dir == str(out)  # ${hydra:runtime.output_dir} resolved
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    for key in ("foscttm", "foscttm_x", "foscttm_y", "train/loss", "val/loss"):
        assert math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["foscttm"] <= 1.0
    latent = ad.read_h5ad(out / "latent_rna.h5ad")
    assert latent.obsm["X_diagvi"].shape == (600, cfg.model.n_latent)
    assert ad.read_h5ad(out / "latent_protein.h5ad").obsm["X_diagvi"].shape == (
        600,
        cfg.model.n_latent,
    )
    png = out / "embedding.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "csv").rglob("metrics.csv")), "CSVLogger wrote no metrics.csv"


def test_train_wandb_offline(e2e_runs):
    run = e2e_runs["wandb"]
    assert_ok(run)
    offline = list((run.run_dir / "wandb").glob("offline-run-*"))
    assert offline and offline[0].is_dir(), sorted(p.name for p in run.run_dir.rglob("*"))[:50]
    assert (run.run_dir / "metrics.json").is_file()


def test_train_unknown_likelihood_lists_options(e2e_runs):
    rc, out = e2e_runs["bogus_likelihood"].wait()
    assert rc != 0
    assert "model/likelihood/bogus" in out, out[-2000:]
    # Hydra lists the group's options, one per indented line, after this header
    assert "Available options in 'model/likelihood'" in out, out[-2000:]
    listed = out.split("Available options in 'model/likelihood':")[1].splitlines()[1:]
    options = []
    for line in listed:
        if not line.startswith(("\t", " ")):
            break
        options.append(line.strip())
    assert set(options) == set(LIKELIHOODS), out[-2000:]
    assert not (e2e_runs["bogus_likelihood"].run_dir / "metrics.json").exists()


# ----------------------------------------------------------------------------- registries


@pytest.mark.parametrize("group", sorted(REGISTRY_OF_GROUP))
def test_registry_matches_config_folder(group):
    registry = REGISTRY_OF_GROUP[group]
    files = sorted((CONFIG_DIR / group).glob("*.yaml"))
    assert {p.stem for p in files} == set(registry)
    for path in files:
        node = OmegaConf.load(path)
        assert get_class(node._target_) is registry.get(path.stem), path
        assert bool(node.get("_partial_", False)) == (group in FACTORY_GROUPS), path


# ----------------------------------------------------------------------------- every option


def check_factory(group, option, cfg, small_data):
    _, graph, spec = small_data
    registry = REGISTRY_OF_GROUP[group]
    node = cfg.model.likelihood.protein if group == "model/likelihood" else cfg.model[group[6:]]
    factory = instantiate(node)
    assert isinstance(factory, functools.partial)
    if group == "model/likelihood":
        obj = factory(n_features=7, n_batches=2)
        assert isinstance(
            instantiate(cfg.model.likelihood.rna)(n_features=3, n_batches=1), Likelihood
        )
        px = obj(torch.randn(4, 7), torch.tensor([0, 1, 1, 0]), torch.full((4, 1), 20.0))
        assert torch.isfinite(px.mean).all()
    elif group == "model/prior":
        obj = factory(4, spec.n_labels)
        qz = torch.distributions.Normal(torch.randn(5, 4), torch.ones(5, 4))
        kl = obj.kl(qz, qz.sample(), torch.tensor([0, 1, 2, -1, -1]))
        assert kl.shape == (5,) and torch.isfinite(kl).all()
    elif group == "model/graph_encoder":
        obj = factory(graph, 4)
        assert obj().loc.shape == (graph.num_nodes, 4)
    else:
        obj = factory(4, spec.n_labels)
        assert obj(torch.randn(5, 4)).shape == (5, spec.n_labels)
    assert type(obj) is registry.get(option)


def check_alignment(option, cfg):
    align = instantiate(cfg.model.alignment)
    assert type(align) is ALIGNMENTS.get(option)
    x, y = torch.randn(12, 3), torch.randn(15, 3) + 1.0
    out = align({"rna": x, "protein": y})
    assert out.dim() == 0 and torch.isfinite(out)


def check_model(cfg, small_data):
    _, _, spec = small_data
    lit = build_model(cfg.model, spec)
    assert isinstance(lit, DiagVILightning)
    assert lit.weights == {k: float(cfg.model[k]) for k in DEFAULT_WEIGHTS}
    assert lit.module.classifier is not None  # spec has labels and a classifier is configured
    n_latent = cfg.model.n_latent
    assert lit.module.g2v().loc.shape == (spec.graph.num_nodes, n_latent)


def check_trainer(option, cfg, tmp_path):
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip("no GPU: a trainer=gpu Trainer cannot be built (test_distributed.py checks it)")
    trainer = instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer, L.Trainer)
    assert trainer.default_root_dir == str(tmp_path)
    assert trainer.logger is None
    if option == "cpu":
        assert trainer.accelerator.__class__.__name__ == "CPUAccelerator"


def check_logger(option, cfg, tmp_path):
    loggers = {k: instantiate(v) for k, v in (cfg.logger or {}).items() if v is not None}
    for logger in loggers.values():
        assert isinstance(logger, Logger)
        assert Path(logger.save_dir) == tmp_path  # ${hydra:runtime.output_dir}
    if option == "none":
        assert loggers == {}
    kinds = {type(lg) for lg in loggers.values()}
    if option == "csv":
        assert kinds == {CSVLogger}
    if option == "wandb":
        assert kinds == {WandbLogger}
        assert cfg.logger.wandb.offline is True  # no account, no network by default


def check_callbacks(option, cfg, tmp_path):
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
    assert all(isinstance(cb, Callback) for cb in callbacks)
    kinds = {type(cb) for cb in callbacks}
    if option == "none":
        assert callbacks == []
    if option == "default":
        assert kinds == {ModelCheckpoint, EarlyStopping}
    if option == "no_early_stopping":
        assert kinds == {ModelCheckpoint}
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint):
            assert Path(cb.dirpath) == tmp_path / "checkpoints"
    # the callbacks a trainer accepts
    L.Trainer(logger=False, callbacks=callbacks, default_root_dir=str(tmp_path), max_epochs=1)


def check_data(option, cfg, tmp_path, compose_cfg):
    names = likelihood_names(cfg)  # every modality has a likelihood
    assert set(names) == set(cfg.data.modalities)
    assert all(n in LIKELIHOODS for n in names.values())
    if option == "h5ad":
        missing = [str(tmp_path / f"missing_{m}.h5ad") for m in cfg.data.modalities]
        over = [
            f"data.load.paths.{m}={p}" for m, p in zip(cfg.data.modalities, missing, strict=True)
        ]
        cfg = compose_cfg([*BASE, "data=h5ad", *over])
        with pytest.raises(Exception) as err:
            instantiate(cfg.data.load)
        # Hydra wraps the loader's error in an InstantiationException; the cause is kept
        cause = err.value if isinstance(err.value, FileNotFoundError) else err.value.__cause__
        assert isinstance(cause, FileNotFoundError), repr(err.value)
        assert missing[0] in str(cause) and missing[0] in str(err.value), str(err.value)
        # with real files it loads them
        adatas, _ = make_synthetic_pair(n_cells=30, n_genes=12, n_proteins=4)
        paths = []
        for m in cfg.data.modalities:
            adatas[m].write_h5ad(tmp_path / f"{m}.h5ad")
            paths.append(f"data.load.paths.{m}={tmp_path / f'{m}.h5ad'}")
        cfg = compose_cfg([*BASE, "data=h5ad", *paths])
    loaded, mapping = instantiate(cfg.data.load)
    assert set(loaded) == set(cfg.data.modalities)
    assert all(isinstance(a, ad.AnnData) and a.n_obs > 0 for a in loaded.values())
    if option == "synthetic":
        assert {a.n_obs for a in loaded.values()} == {cfg.data.load.n_cells}
    if option != "h5ad":
        # the full data path: validation, guidance graph, spec and loaders
        dm, spec, _ = build_datamodule(cfg)
        assert set(spec.modalities) == set(cfg.data.modalities)
        batch = next(iter(dm.train_dataloader()))
        assert set(batch) == set(cfg.data.modalities)


@pytest.mark.parametrize(
    ("group", "option"), GROUP_OPTIONS, ids=[f"{g}/{o}" for g, o in GROUP_OPTIONS]
)
def test_every_config_option_instantiates(group, option, compose_cfg, small_data, tmp_path):
    if group == "data":
        cfg = compose_cfg([*BASE, f"data={option}"])
    else:
        cfg = compose_cfg([*BASE, option_override(group, option)])
    if group in FACTORY_GROUPS:
        check_factory(group, option, cfg, small_data)
    elif group == "model/alignment":
        check_alignment(option, cfg)
    elif group == "model":
        check_model(cfg, small_data)
    elif group == "trainer":
        check_trainer(option, cfg, tmp_path)
    elif group == "logger":
        check_logger(option, cfg, tmp_path)
    elif group == "callbacks":
        check_callbacks(option, cfg, tmp_path)
    elif group == "data":
        check_data(option, cfg, tmp_path, compose_cfg)
    elif group == "hparams_search":
        # a search composes: a known objective with its direction, a non-empty search space
        from diagvi.outputs import OBJECTIVE_DIRECTIONS
        from hydra_plugins.diagvi_optuna_sweeper.sweeper import search_space

        sweeper = cfg.hydra.sweeper
        assert OBJECTIVE_DIRECTIONS[sweeper.metric_name] == sweeper.direction
        assert search_space(OmegaConf.to_container(sweeper.params), [])[1]
    elif group == "experiment":
        # an experiment composes and still yields a buildable trainer
        instantiate(cfg.trainer, logger=False)
    else:
        pytest.fail(f"no check for config group {group!r}: add one to tests/test_configs.py")


def test_config_groups_are_all_checked():
    assert {g for g, _ in GROUP_OPTIONS} >= set(REGISTRY_OF_GROUP) | {"data", "trainer", "logger"}


# ----------------------------------------------------------------------------- overrides


@pytest.mark.parametrize("data", ["synthetic", "demo"])
def test_per_modality_likelihood_override(compose_cfg, data):
    cfg = compose_cfg([f"data={data}", "model/likelihood@model.likelihood.protein=zinb"])
    assert likelihood_names(cfg) == {"rna": "nb", "protein": "zinb"}
    assert instantiate(cfg.model.likelihood.protein).func is LIKELIHOODS.get("zinb")
    assert instantiate(cfg.model.likelihood.rna).func is LIKELIHOODS.get("nb")
    cfg = compose_cfg(
        [
            f"data={data}",
            "model/likelihood@model.likelihood.rna=zinb",
            "model/likelihood@model.likelihood.protein=nbmixture",
        ]
    )
    assert likelihood_names(cfg) == {"rna": "zinb", "protein": "nbmixture"}


def test_default_config_composes(compose_cfg):
    cfg = compose_cfg([])
    assert cfg.hydra.runtime.choices["data"] == "demo"
    assert likelihood_names(cfg) == {"rna": "nb", "protein": "log1pnormal"}
    assert set(cfg.model.likelihood) == set(cfg.data.modalities)


def test_early_stopping_without_validation_cells_is_refused_before_training(e2e_runs):
    rc, out = e2e_runs["no_validation_cells"].wait()
    assert rc != 0
    assert "early stopping monitors 'val/loss', but no cells are held out" in out, out[-2000:]
    assert "callbacks=no_early_stopping" in out
    assert not (e2e_runs["no_validation_cells"].run_dir / "metrics.json").exists()


def test_h5ad_guidance_mapping_on_missing_and_empty(compose_cfg, tmp_path):
    """data=h5ad: no mapping table with guidance=mapping is refused (not silently linked by
    name); on_missing and each modality's empty policy are config keys."""
    adatas, mapping = make_synthetic_pair(n_cells=40, n_genes=12, n_proteins=4)
    adatas["rna"].X[0] = 0  # an all-zero cell
    paths = []
    for m, adata in adatas.items():
        adata.write_h5ad(tmp_path / f"{m}.h5ad")
        paths.append(f"data.load.paths.{m}={tmp_path / f'{m}.h5ad'}")
    h5ad = [*BASE, "data=h5ad", *paths]
    with pytest.raises(DataError, match="data.guidance=mapping needs a mapping table"):
        build_datamodule(compose_cfg(h5ad))
    extra = pd.concat([mapping, pd.DataFrame({"rna": ["NOT_A_GENE"], "protein": ["p"]})])
    extra.to_csv(tmp_path / "links.csv", index=False)
    links = f"data.mapping_path={tmp_path / 'links.csv'}"
    with pytest.raises(DataError, match="data.on_missing=ignore"):
        build_datamodule(compose_cfg([*h5ad, links]))
    with pytest.warns(UserWarning, match="ignoring those rows"):
        dm, spec, _ = build_datamodule(
            compose_cfg([*h5ad, links, "data.on_missing=ignore", "data.modalities.rna.empty=drop"])
        )
    assert dm.data["rna"].n_obs == 39 and len(spec.graph.edge_index[0]) > 0
    with pytest.raises(DataError, match="share no feature name.*data.mapping_path=links.csv"):
        build_datamodule(compose_cfg([*h5ad, "data.guidance=shared_names"]))


@pytest.mark.parametrize("option", ["uot", "sinkhorn"])
def test_sinkhorn_configs_expose_every_setting(option):
    """Every argument of the Sinkhorn alignments is a key of its config, so a sweep or the
    command line sets it without Hydra's ``+`` (balanced: all but the reach)."""
    import inspect

    from diagvi.components.alignment import UnbalancedSinkhorn

    cfg = OmegaConf.load(CONFIG_DIR / "model" / "alignment" / f"{option}.yaml")
    expected = set(inspect.signature(UnbalancedSinkhorn.__init__).parameters) - {"self"}
    if option == "sinkhorn":
        expected.discard("reach_scale")
    assert set(cfg) - {"_target_"} == expected
