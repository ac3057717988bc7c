"""The joint-embedding figure every run writes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# points drawn per panel: a random subset beyond this (millions of dots draw slowly, show no more)
MAX_POINTS = 200_000


def pca_2d(x: np.ndarray) -> np.ndarray:
    """First two principal components of ``x`` (rows are cells); a second column of zeros
    when ``x`` has only one (a one-dimensional latent, or a single cell)."""
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    return np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))


def plot_joint_embedding(
    latents: Mapping[str, np.ndarray],
    path: str | Path | None = None,
    labels: Mapping[str, np.ndarray] | None = None,
) -> Path | Figure:
    """PCA of the joint latent space, coloured by modality and (when given) by label.

    Parameters
    ----------
    latents
        ``{modality: (cells, n_latent)}``.
    path
        Output PNG; ``None`` returns the open Figure instead.
    labels
        ``{modality: label per cell}``; missing modalities or ``None`` entries are "unlabelled".

    Cells whose latent is not finite (a diverged model) are left out: the PCA cannot take them.
    """
    names = list(latents)
    z = np.concatenate([latents[n] for n in names])
    finite = np.isfinite(z).all(axis=1)
    xy = np.zeros((len(z), 2))
    if finite.any():
        xy[finite] = pca_2d(z[finite])
    modality = np.concatenate([[n] * len(latents[n]) for n in names])
    panels = [("modality", modality)]
    if labels:
        lab = np.concatenate(
            [
                np.asarray(
                    [None] * len(latents[n]) if labels.get(n) is None else labels[n], dtype=object
                )
                for n in names
            ]
        )
        panels.append(("label", np.where(pd.isna(lab), "unlabelled", lab).astype(str)))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    # no modality drawn on top of the other; at most MAX_POINTS drawn (the PCA uses all the
    # finite ones)
    order = np.random.default_rng(0).permutation(len(xy))[:MAX_POINTS]
    order = order[finite[order]]
    for ax, (title, values) in zip(axes[0], panels, strict=True):
        for category in np.unique(values):
            keep = order[values[order] == category]
            ax.scatter(xy[keep, 0], xy[keep, 1], s=4, alpha=0.6, label=category)
        ax.set(title=f"diagvi latent (PCA), by {title}", xlabel="PC1", ylabel="PC2")
        ax.legend(markerscale=3, fontsize=7, loc="best")
    return _finish(fig, path)


def plot_history(history: pd.DataFrame, path: str | Path | None = None) -> Path | Figure:
    """Training curves: one panel per loss term, train and validation together.

    Parameters
    ----------
    history
        Per-epoch values with columns ``train/<term>`` and ``val/<term>`` (``model.history``).
    path
        Output PNG; ``None`` returns the open Figure instead.
    """
    terms = sorted({c.split("/", 1)[1] for c in history.columns if "/" in c})
    cols = min(4, len(terms))
    rows = -(-len(terms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, term in zip(axes.flat, terms, strict=False):
        for stage in ("train", "val"):
            if f"{stage}/{term}" in history:
                ax.plot(history.index, history[f"{stage}/{term}"], label=stage)
        ax.set(title=term, xlabel="epoch")
        ax.legend(fontsize=7)
    for ax in axes.flat[len(terms) :]:
        ax.axis("off")
    return _finish(fig, path)


def _finish(fig: Figure, path: str | Path | None) -> Path | Figure:
    fig.tight_layout()
    if path is None:
        return fig
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
