"""Audit of what a finished run writes (:mod:`diagvi.outputs`), the embedding figure
(:mod:`diagvi.plotting`) and the sweep report (:mod:`diagvi.report`): tiny synthetic data and
in-file Optuna studies, no training."""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from diagvi import DIAGVI
from diagvi.data import PairedDataModule
from diagvi.outputs import heldout_metric, paired_foscttm, write_run_outputs
from diagvi.plotting import plot_joint_embedding
from diagvi.report import main, trials_frame, write_report
from diagvi.synthetic import make_synthetic_pair

optuna.logging.set_verbosity(optuna.logging.ERROR)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def tiny_model(n_latent: int = 4, labels: bool = True):
    """An untrained DIAGVI on 40 paired cells, labelled in both modalities (``labels``)."""
    adatas, mapping = make_synthetic_pair(n_cells=40, n_genes=12, n_proteins=4)
    key = "cell_type" if labels else None
    DIAGVI.setup_anndata(adatas["rna"], labels_key=key)
    DIAGVI.setup_anndata(adatas["protein"], labels_key=key)
    torch.manual_seed(0)
    return DIAGVI(adatas, mapping_df=mapping, n_latent=n_latent), adatas


def diverge(model: DIAGVI, modality: str) -> None:
    """Make ``modality``'s encoder give NaN latents, as a diverged model does."""
    with torch.no_grad():
        for p in model.module.x2z[modality].parameters():
            p.fill_(float("nan"))


# ----------------------------------------------------------------------------- outputs


def test_paired_foscttm_of_nonfinite_latents_is_nan():
    """A NaN distance is never "closer": a diverged latent must not score as perfect (0)."""
    model, _ = tiny_model()
    z = {m: np.random.default_rng(0).normal(size=(d.n_obs, 4)) for m, d in model.data.items()}
    z["protein"][:] = np.nan
    result = paired_foscttm(z, model.data)
    assert math.isnan(result["foscttm"])


def test_heldout_objectives_of_a_diverged_model_are_nan():
    """NaN, so that the run stops with "training diverged" and the trial is not ranked."""
    model, _ = tiny_model()
    dm = PairedDataModule(model.data, batch_size=16, val_fraction=0.5, seed=0)
    assert 0.0 <= heldout_metric("val/label_transfer", model.module, dm) <= 1.0
    diverge(model, "protein")
    assert math.isnan(heldout_metric("val/foscttm", model.module, dm))
    assert math.isnan(heldout_metric("val/label_transfer", model.module, dm))


def test_run_outputs_of_a_diverged_model_are_written_and_reported(tmp_path):
    model, adatas = tiny_model()
    diverge(model, "protein")
    with pytest.warns(UserWarning, match="not finite"):
        written = write_run_outputs(model.module, model.data, adatas, tmp_path, paired=True)
    assert written["nonfinite_protein"] == adatas["protein"].n_obs
    assert "nonfinite_rna" not in written
    assert math.isnan(written["foscttm"])
    assert (tmp_path / "embedding.png").read_bytes()[:4] == b"\x89PNG"
    latent = ad.read_h5ad(tmp_path / "latent_protein.h5ad")
    assert list(latent.obs_names) == list(adatas["protein"].obs_names)
    assert np.isnan(latent.obsm["X_diagvi"]).all()


def test_run_outputs_with_a_one_dimensional_latent(tmp_path):
    """``model.n_latent=1`` is a valid model: its run must not fail at the figure."""
    model, adatas = tiny_model(n_latent=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a finite model: no warning
        written = write_run_outputs(model.module, model.data, adatas, tmp_path, paired=True)
    assert (tmp_path / "embedding.png").read_bytes()[:4] == b"\x89PNG"
    assert 0.0 <= written["foscttm"] <= 1.0
    z = model.get_latent_representation()
    for m, adata in adatas.items():
        latent = ad.read_h5ad(tmp_path / f"latent_{m}.h5ad")
        assert list(latent.obs_names) == list(adata.obs_names)
        np.testing.assert_allclose(latent.obsm["X_diagvi"], z[m], rtol=1e-5, atol=1e-6)


def test_run_outputs_rows_follow_obs_names_and_leave_user_obs_alone(tmp_path):
    model, adatas = tiny_model(labels=False)
    before = {m: a.obs.copy() for m, a in adatas.items()}
    write_run_outputs(model.module, model.data, adatas, tmp_path)
    z = model.get_latent_representation()
    for m, adata in adatas.items():
        pd.testing.assert_frame_equal(adata.obs, before[m])
        latent = ad.read_h5ad(tmp_path / f"latent_{m}.h5ad")
        assert list(latent.obs["cell_type"]) == list(adata.obs["cell_type"])
        np.testing.assert_allclose(latent.obsm["X_diagvi"], z[m], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- plotting


def test_embedding_plot_takes_none_label_entries(tmp_path):
    """The docstring: a ``None`` entry of ``labels`` is an unlabelled modality."""
    rng = np.random.default_rng(0)
    latents = {"rna": rng.normal(size=(12, 3)), "protein": rng.normal(size=(8, 3))}
    labels = {"rna": np.array(["a", "b"] * 6, dtype=object), "protein": None}
    fig = plot_joint_embedding(latents, None, labels)
    legend = {t.get_text() for t in fig.axes[1].get_legend().get_texts()}
    assert legend == {"a", "b", "unlabelled"}
    # the protein cells are the unlabelled ones
    unlabelled = [c for c in fig.axes[1].collections if c.get_label() == "unlabelled"]
    assert len(unlabelled[0].get_offsets()) == 8


# ----------------------------------------------------------------------------- report


def make_study(tmp_path, direction: str, outcomes: list) -> optuna.Study:
    """A study in ``tmp_path`` (with its ``study.yaml``) holding trials of ``outcomes``:
    ``(state, value)``, a PRUNED value being its last intermediate value, or ``"running"``."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=storage, direction=direction)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["val/metric"])
    info = {"study_name": "s", "storage": storage, "metric": "val/metric"}
    OmegaConf.save(OmegaConf.create(info), tmp_path / "study.yaml")
    space = {
        "model.lr": FloatDistribution(1e-4, 1e-2, log=True),
        "model/alignment": CategoricalDistribution(["uot", "sinkhorn"]),
    }
    for outcome in outcomes:
        trial = study.ask(space)
        if outcome == "running":
            continue
        state, value = outcome
        if state == TrialState.PRUNED:
            trial.report(value, step=0)
            value = None
        study.tell(trial, value, state=state)
    return study


def test_report_of_a_study_without_trials(tmp_path, capsys):
    make_study(tmp_path, "minimize", [])
    main([str(tmp_path)])
    assert "0 trials" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "trials.csv")
    assert list(table.columns) == ["number", "state", "val/metric"]
    assert not (tmp_path / "best_experiment.yaml").exists()


def test_report_keeps_the_objective_column_when_no_trial_finished(tmp_path):
    make_study(tmp_path, "maximize", [(TrialState.FAIL, None), "running"])
    out = write_report(tmp_path)
    table = pd.read_csv(out["csv"])
    assert list(table["state"]) == ["FAIL", "RUNNING"]
    assert table["val/metric"].isna().all()
    assert "val/metric" in out["md"].read_text().splitlines()[2]
    assert "best" not in out


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_report_ranks_by_the_study_direction(tmp_path, direction):
    c, p, f = TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL
    outcomes = [(c, 0.5), (c, 0.9), (f, None), (c, 0.7), (p, 0.95), (p, 0.1), "running"]
    study = make_study(tmp_path, direction, outcomes)
    table = trials_frame(study)
    best_first = [1, 3, 0] if direction == "maximize" else [0, 3, 1]
    pruned = [4, 5] if direction == "maximize" else [5, 4]
    assert list(table["number"]) == [*best_first, *pruned, 2, 6]
    assert list(table["state"]) == ["COMPLETE"] * 3 + ["PRUNED"] * 2 + ["FAIL", "RUNNING"]
    out = write_report(tmp_path)
    best = study.trials[best_first[0]]
    text = out["best"].read_text()
    assert f"Best trial ({best.number})" in text and f"({direction})" in text
    assert f"override /model/alignment: {best.params['model/alignment']}" in text


def test_report_of_a_one_trial_sweep_plots_every_parameter(tmp_path):
    make_study(tmp_path, "minimize", [(TrialState.COMPLETE, 0.3)])
    out = write_report(tmp_path)
    for key in ("history", "objective_vs_model.lr", "objective_vs_model_alignment"):
        assert out[key].read_bytes()[:4] == b"\x89PNG", key


def compose_best(tmp_path, best: str):
    """The config that ``experiment=best`` composes, ``best`` a ``best_experiment.yaml``."""
    configs = shutil.copytree(CONFIG_DIR, tmp_path / "configs")
    shutil.copy(best, configs / "experiment" / "best.yaml")
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        return compose("train", overrides=["experiment=best"], return_hydra_config=True)


def sweep_of(tmp_path, trials: list[tuple[dict, float]]) -> dict:
    """The report of a minimised study of ``trials`` (``(params, value)``)."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=storage)
    space = {
        "model.lr": FloatDistribution(1e-4, 1e-2, log=True),
        "model/alignment": CategoricalDistribution(["uot", "sinkhorn"]),
        "model/classifier": CategoricalDistribution(["linear", None]),
    }
    for params, value in trials:
        study.enqueue_trial(params)
        trial = study.ask({k: space[k] for k in params})
        study.tell(trial, value)
    return write_report(tmp_path, storage=storage, study_name="s")


def test_best_experiment_of_a_sweep_over_config_groups_only(tmp_path):
    """No plain values: the file must still be YAML (an empty body was written as ``{}``)."""
    out = sweep_of(
        tmp_path, [({"model/alignment": "uot"}, 0.4), ({"model/alignment": "sinkhorn"}, 0.2)]
    )
    cfg = compose_best(tmp_path, out["best"])
    assert cfg.hydra.runtime.choices["model/alignment"] == "sinkhorn"


def test_best_experiment_without_a_group_choice(tmp_path):
    """The best trial of ``model/classifier=choice(linear,null)`` has none: YAML's null."""
    trials = [
        ({"model.lr": 1e-3, "model/classifier": None}, 0.2),
        ({"model.lr": 2e-3, "model/classifier": "linear"}, 0.4),
    ]
    cfg = compose_best(tmp_path, sweep_of(tmp_path, trials)["best"])
    assert cfg.model.get("classifier") is None
    assert cfg.model.lr == pytest.approx(1e-3)
