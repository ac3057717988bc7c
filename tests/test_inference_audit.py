"""Audit of the plots (backend, colours, gaps); kNN imputation memory: test_api_audit.py."""

from __future__ import annotations

import importlib

import matplotlib
import numpy as np
import pandas as pd

import diagvi.plotting
from diagvi.plotting import plot_history, plot_joint_embedding

# ----------------------------------------------------------------------------- plots


def test_importing_the_plots_keeps_the_users_backend():
    """``import diagvi`` (model.py imports the plots) switched every user to Agg: figures
    stopped showing in notebooks and GUI sessions."""
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        importlib.reload(diagvi.plotting)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
        importlib.reload(diagvi.plotting)


def test_embedding_plot_writes_files_without_pyplot_figures(tmp_path):
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    latents = {"rna": rng.normal(size=(5, 3)), "protein": rng.normal(size=(4, 3))}
    open_before = plt.get_fignums()
    path = plot_joint_embedding(latents, tmp_path / "e.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert plt.get_fignums() == open_before


def test_embedding_plot_gives_every_label_its_own_colour():
    """25 cell types were drawn with the 10 colours of the default cycle."""
    rng = np.random.default_rng(0)
    latents = {"rna": rng.normal(size=(100, 3)), "protein": rng.normal(size=(20, 3))}
    labels = {"rna": np.array([f"type_{i % 25}" for i in range(100)], dtype=object)}
    fig = plot_joint_embedding(latents, None, labels)
    colours = [tuple(c.get_facecolor()[0]) for c in fig.axes[1].collections]
    assert len(colours) == 26  # 25 types and "unlabelled"
    assert len(set(colours)) == 26
    # few categories keep the default colours
    modality = [tuple(c.get_facecolor()[0][:3]) for c in fig.axes[0].collections]
    assert modality == [matplotlib.colors.to_rgb(f"C{i}") for i in range(2)]


def test_history_plot_draws_validation_of_sparse_epochs():
    """With ``check_val_every_n_epoch=2`` every other epoch has NaN: the validation curve was
    drawn as isolated points between gaps, i.e. not at all."""
    history = pd.DataFrame(
        {"train/loss": [3.0, 2.0, 1.0, 0.5, 0.4], "val/loss": [np.nan, 2.5, np.nan, 1.5, np.nan]}
    )
    history.index.name = "epoch"
    fig = plot_history(history)
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    np.testing.assert_array_equal(lines["val"].get_xdata(), [1, 3])
    np.testing.assert_array_equal(lines["val"].get_ydata(), [2.5, 1.5])
    np.testing.assert_array_equal(lines["train"].get_ydata(), history["train/loss"])
