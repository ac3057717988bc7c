"""Integration metrics as pure functions on arrays."""

from __future__ import annotations

import numpy as np
import torch


def _fraction_closer(x: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
    """For each row i of x: fraction of rows of y closer to x_i than its true match y_i."""
    out = torch.empty(len(x), dtype=torch.float64)
    n = len(y)
    for start in range(0, len(x), chunk):
        xs = x[start : start + chunk]
        d = torch.cdist(xs, y)
        true = d[torch.arange(len(xs)), torch.arange(start, start + len(xs))]
        out[start : start + len(xs)] = (d < true[:, None]).sum(1).double() / (n - 1)
    return out


def foscttm(x: np.ndarray, y: np.ndarray, chunk: int = 2048) -> dict[str, float]:
    """Fraction Of Samples Closer Than the True Match (Liu et al. 2019), both directions.

    Row ``i`` of ``x`` and row ``i`` of ``y`` are the same cell measured in two modalities.
    For cell ``i``, ``FOSCTTM_x(i) = #{j != i : d(x_i, y_j) < d(x_i, y_i)} / (n - 1)``, and
    symmetrically from ``y``; 0 is perfect, 0.5 is random. Computed in chunks of rows, so
    memory is ``chunk x n``, never ``n x n``.

    Returns
    -------
    ``{"foscttm": mean of both directions, "foscttm_x": ..., "foscttm_y": ...}``
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"paired embeddings need equal numbers of rows, got {x.shape[0]} and {y.shape[0]}"
        )
    tx = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    ty = torch.as_tensor(np.asarray(y), dtype=torch.float32)
    fx = _fraction_closer(tx, ty, chunk).mean().item()
    fy = _fraction_closer(ty, tx, chunk).mean().item()
    return {"foscttm": (fx + fy) / 2, "foscttm_x": fx, "foscttm_y": fy}
