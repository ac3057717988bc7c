"""Audit of inference (kNN imputation memory) and of the plots (backend, colours, gaps)."""

from __future__ import annotations

import importlib
import tracemalloc

import matplotlib
import numpy as np
import pandas as pd

import diagvi.plotting
from diagvi import inference
from diagvi.data import ModalityData, ModalitySetup
from diagvi.plotting import plot_history, plot_joint_embedding

# ----------------------------------------------------------------------------- kNN imputation


def test_knn_imputation_memory_stays_bounded_with_a_large_reference():
    """With more reference cells than ``batch_size * k``, a block's neighbours are (almost) all
    distinct: reading them at once held ``batch_size * k * features`` float64 values."""
    rng = np.random.default_rng(0)
    n_source, n_target, n_features, k = 200, 4000, 500, 20
    x = rng.poisson(3.0, (n_target, n_features)).astype(np.float32)
    target = ModalityData(
        "protein",
        x,
        np.zeros(n_target, dtype=np.int64),
        np.full(n_target, -1, dtype=np.int64),
        pd.Index([f"c{i}" for i in range(n_target)]),
        pd.Index([f"p{j}" for j in range(n_features)]),
        ["0"],
        ModalitySetup(),
    )
    z_source = rng.normal(size=(n_source, 3)).astype(np.float32)
    z_target = rng.normal(size=(n_target, 3)).astype(np.float32)
    library = np.full(n_source, 100.0, dtype=np.float32)
    tracemalloc.start()
    try:
        imputed = inference.knn_imputed_values(
            z_source, z_target, target, library, k=k, batch_size=n_source
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    gathered = n_source * k * n_features * 8  # 15 MiB; the result is 0.4 MiB
    assert peak < gathered / 4, f"peak {peak / 2**20:.1f} MiB"
    dist = ((z_source[:, None] - z_target[None]) ** 2).sum(-1)
    profiles = x / x.sum(1, keepdims=True)
    expected = 100.0 * profiles[np.argsort(dist, 1)[:, :k]].mean(1)
    np.testing.assert_allclose(imputed, expected, rtol=1e-5)
    # the same without library (continuous values): the plain mean of the neighbours
    plain = inference.knn_imputed_values(z_source, z_target, target, None, k=k, batch_size=7)
    np.testing.assert_allclose(plain, x[np.argsort(dist, 1)[:, :k]].mean(1), rtol=1e-5)


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
