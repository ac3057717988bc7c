"""Inference over all cells of a modality, in order, in minibatches (no gradients)."""

from __future__ import annotations

import numpy as np
import torch

from diagvi.data import ModalityData
from diagvi.module import DiagVAE


@torch.no_grad()
def latent_representation(
    module: DiagVAE, data: ModalityData, batch_size: int = 1024, give_mean: bool = True
) -> np.ndarray:
    """Posterior mean (or one sample) of ``z`` for every cell of ``data``, in row order."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    out = []
    for start in range(0, data.n_obs, batch_size):
        rows = data.rows(np.arange(start, min(start + batch_size, data.n_obs)))
        qz = module.encode(data.name, rows["x"].to(device))
        out.append((qz.loc if give_mean else qz.sample()).cpu().numpy())
    module.train(was_training)
    return np.concatenate(out)
