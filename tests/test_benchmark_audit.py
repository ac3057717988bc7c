"""Audit of experiments/benchmark: what a run scores must be what was trained (no .venv-ref)."""

from __future__ import annotations

import json
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from experiments.benchmark import datasets, run, twin_floor
from experiments.benchmark.runner_io import write_outputs


def _toy(max_cells: int | None = None, n: int = 60, first: int = 0) -> datasets.BenchData:
    """Paired toy data; ``max_cells`` keeps that many cells from ``first`` on, as a
    subsampled loader would."""
    rng = np.random.default_rng(0)
    labels = np.repeat(["x", "y", "z"], n // 3)
    counts = rng.poisson(3, size=(n, 5)).astype(np.float32) + 1
    keep = np.arange(first, n if max_cells is None else min(n, first + max_cells))
    adatas = {}
    for m in ("a", "b"):
        adata = ad.AnnData(counts[keep], obs=pd.DataFrame(index=[f"c{i}" for i in keep]))
        adata.var_names = [f"g{j}" for j in range(5)]
        adata.layers["counts"] = adata.X.copy()
        adatas[m] = adata
    return datasets.BenchData(
        name="toy",
        adatas=adatas,
        mapping=pd.DataFrame({"a": ["g0", "g1"], "b": ["g0", "g1"]}),
        labels={"a": labels[keep], "b": labels[keep]},
        pairs=np.stack([np.arange(len(keep))] * 2, 1),
    )


def _config(ds: datasets.BenchData, epochs: int = 2, seed: int = 0) -> dict:
    """The config run.main builds for diagvi with default settings."""
    return {
        "modalities": ds.modalities,
        "labels": {m: m in ds.train_labels for m in ds.modalities},
        "likelihood": {m: ds.likelihood(m) for m in ds.modalities},
        "n_latent": 20,
        "epochs": epochs,
        "batch_size": 256,
        "seed": seed,
        "threads": None,
        "accelerator": "cpu",
        "impute": None,
        "init": {},
        "train": {},
    }


def _finished_run(out, ds: datasets.BenchData, config: dict, latents=None) -> dict:
    if latents is None:
        latents = {
            m: np.random.default_rng(1).normal(size=(a.n_obs, 2)) for m, a in ds.adatas.items()
        }
    write_outputs(out, latents, None, 2.0, 2, 100.0, "diagvi")
    (out / "config.json").write_text(json.dumps(config))
    return latents


def test_rescore_refuses_latents_of_other_cells(tmp_path, monkeypatch):
    """A run trained on cells 0-29, rescored after the loader picks cells 30-59 (as many): the
    latents' rows were scored as the cells loaded now (before: silently; with another number
    of cells the scores failed only by accident, on a boolean index)."""
    trained = _toy(max_cells=30)
    work, out = tmp_path / "work", tmp_path / "out"
    run.write_inputs(trained, work / "toy" / "input")
    _finished_run(work / "toy" / "diagvi_seed0", trained, _config(trained))
    args = ["--ref-python", sys.executable, "--datasets", "toy", "--methods", "diagvi"]
    args += ["--seeds", "0", "--epochs", "2", "--rescore", "--out", str(out)]
    args += ["--work-dir", str(work), "--max-cells", "30"]
    monkeypatch.setitem(datasets.LOADERS, "toy", lambda max_cells=None: _toy(max_cells, first=30))
    run.main(args)
    assert pd.read_csv(out / "results.csv").empty
    assert "other cells" in (out / "results.md").read_text()
    # the data it was trained on is rescored
    monkeypatch.setitem(datasets.LOADERS, "toy", lambda max_cells=None: _toy(max_cells))
    run.main(args)
    results = pd.read_csv(out / "results.csv")
    assert set(results["method"]) == {"diagvi"} and "foscttm" in set(results["metric"])


def test_input_mismatch_names_what_differs(tmp_path):
    ds = _toy()
    run.write_inputs(ds, tmp_path)
    assert run.input_mismatch(ds, tmp_path) is None
    assert "other cells" in run.input_mismatch(_toy(max_cells=30), tmp_path)
    changed = _toy()
    changed.adatas["b"].layers["counts"][0, 0] += 1
    assert "other counts" in run.input_mismatch(changed, tmp_path)
    changed = _toy()
    changed.mapping = pd.DataFrame({"a": ["g0"], "b": ["g0"]})
    assert "mapping" in run.input_mismatch(changed, tmp_path)
    assert "missing" in run.input_mismatch(ds, tmp_path / "nothing")


def test_failed_retrain_leaves_no_stale_outputs_to_rescore(tmp_path):
    """A retrain with new settings that fails must not leave the old run's latents under the
    new config.json (before: --rescore scored the old run as the new one)."""
    ds = _toy()
    in_dir, out = tmp_path / "input", tmp_path / "diagvi_seed0"
    run.write_inputs(ds, in_dir)
    old = _config(ds, epochs=2)
    _finished_run(out, ds, old)
    failing = tmp_path / "failing_runner.py"
    failing.write_text("raise SystemExit(3)\n")
    new = _config(ds, epochs=100)
    with pytest.raises(RuntimeError, match="failed"):
        run.run_model(sys.executable, str(failing), in_dir, out, new)
    with pytest.raises((RuntimeError, FileNotFoundError)):
        run.read_outputs(out, new)
    assert not list(out.glob("latent_*.npy"))


def test_non_finite_latents_are_a_failed_run(tmp_path):
    ds = _toy()
    config = _config(ds)
    latents = {m: np.zeros((a.n_obs, 2)) for m, a in ds.adatas.items()}
    latents["b"][5] = np.nan  # scored before: label transfer ignored the NaN distances
    _finished_run(tmp_path, ds, config, latents)
    with pytest.raises(RuntimeError, match="non-finite"):
        run.read_outputs(tmp_path, config)


def test_outputs_must_have_one_row_per_cell(tmp_path):
    ds = _toy()
    config = _config(ds)
    _finished_run(tmp_path, ds, config)
    n_obs = {m: a.n_obs for m, a in ds.adatas.items()}
    assert len(run.read_outputs(tmp_path, config, n_obs)[1]["a"]) == 60
    with pytest.raises(RuntimeError, match="rows"):
        run.read_outputs(tmp_path, config, {**n_obs, "b": 30})
    np.save(tmp_path / "predicted.npy", np.array(["x"] * 59))
    with pytest.raises(RuntimeError, match="predicted"):
        run.read_outputs(tmp_path, config, n_obs)


def test_twin_floor_refuses_runs_of_other_cells(tmp_path):
    full, small = _toy(), _toy(max_cells=30)
    run.write_inputs(full, tmp_path / "toy" / "input")
    _finished_run(tmp_path / "toy" / "diagvi_seed0", full, _config(full))
    assert any(r["embedding"] == "diagvi" for r in twin_floor.rows(full, tmp_path))
    with pytest.raises(RuntimeError, match="other cells"):
        twin_floor.rows(small, tmp_path)
