"""The joint-embedding figure every run writes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

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
    fig = _figure(path, (5.5 * len(panels), 4.5))
    axes = fig.subplots(1, len(panels), squeeze=False)
    # no modality drawn on top of the other; at most MAX_POINTS drawn (the PCA uses all the
    # finite ones)
    order = np.random.default_rng(0).permutation(len(xy))[:MAX_POINTS]
    order = order[finite[order]]
    for ax, (title, values) in zip(axes[0], panels, strict=True):
        categories = np.unique(values)
        for category, colour in zip(categories, _colours(len(categories)), strict=True):
            keep = order[values[order] == category]
            ax.scatter(xy[keep, 0], xy[keep, 1], s=4, alpha=0.6, color=colour, label=category)
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
    fig = _figure(path, (3.2 * cols, 2.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, term in zip(axes.flat, terms, strict=False):
        for stage in ("train", "val"):
            if f"{stage}/{term}" in history:
                # epochs without a value (no validation there) are skipped, not gaps: a curve
                # validated every other epoch would be isolated points, drawn as nothing
                values = history[f"{stage}/{term}"].dropna()
                ax.plot(values.index, values, label=stage)
        ax.set(title=term, xlabel="epoch")
        ax.legend(fontsize=7)
    for ax in axes.flat[len(terms) :]:
        ax.axis("off")
    return _finish(fig, path)


def _figure(path: str | Path | None, figsize: tuple[float, float]) -> Figure:
    """A pyplot figure (the user's backend, for showing) when it is returned; a plain Figure
    when it is only written to ``path``: no display, no pyplot state, whatever the backend."""
    return plt.figure(figsize=figsize) if path is None else Figure(figsize=figsize)


def _colours(n: int) -> list:
    """``n`` distinct colours: the default cycle's up to 10, tab20's up to 20, else evenly
    spaced ones (the cycle repeats after 10: two cell types would share a colour)."""
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    if n <= 20:
        return list(matplotlib.colormaps["tab20"].colors[:n])
    return list(matplotlib.colormaps["turbo"](np.linspace(0.0, 1.0, n)))


def _finish(fig: Figure, path: str | Path | None) -> Path | Figure:
    fig.tight_layout()
    if path is None:
        return fig
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
