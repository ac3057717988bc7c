"""Inference over all cells of a modality, in order, in minibatches (no gradients)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from diagvi.data import ModalityData
from diagvi.module import DiagVAE


def _inference(fn):
    """No gradients, module in eval mode (dropout off) and restored afterwards."""

    @functools.wraps(fn)
    @torch.no_grad()
    def run(module: DiagVAE, *args, **kwargs):
        was_training = module.training
        module.eval()
        try:
            return fn(module, *args, **kwargs)
        finally:
            module.train(was_training)

    return run


@_inference
def latent_representation(
    module: DiagVAE, data: ModalityData, batch_size: int = 1024, give_mean: bool = True
) -> np.ndarray:
    """Posterior mean (or one sample) of ``z`` for every cell of ``data``, in row order."""
    device = next(module.parameters()).device
    out = []
    for idx in _minibatches(data.n_obs, batch_size):
        rows = data.rows(idx)
        qz = module.encode(data.name, rows["x"].to(device))
        out.append((qz.loc if give_mean else qz.sample()).cpu().numpy())
    return np.concatenate(out)


def _minibatches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield np.arange(start, min(start + batch_size, n))


@_inference
def feature_embeddings(module: DiagVAE) -> torch.Tensor:
    """Mean feature embeddings ``E[v] = qv.loc`` of every graph node (one graph-encoder pass)."""
    return module.g2v().loc


@_inference
def imputed_values(
    module: DiagVAE,
    source: ModalityData,
    target: str,
    batch: np.ndarray,
    library: np.ndarray,
    batch_size: int = 1024,
) -> np.ndarray:
    """Mean of ``p(x_target | z)`` for the source cells, ``z`` their posterior mean.

    The source cells are encoded by the source modality's encoder; ``z`` is decoded by the
    *target* modality's decoder and likelihood with the target's mean feature embeddings
    (computed once), batch codes ``batch`` and library sizes ``library`` (one per cell).
    """
    device = next(module.parameters()).device
    v = feature_embeddings(module).to(device)
    out = []
    for idx in _minibatches(source.n_obs, batch_size):
        x = source.rows(idx)["x"].to(device)
        z = module.encode(source.name, x).loc
        b = torch.as_tensor(batch[idx], dtype=torch.long, device=device)
        lib = torch.as_tensor(library[idx], dtype=torch.float32, device=device).unsqueeze(-1)
        out.append(module.decode(target, z, v, b, lib).mean.cpu().numpy())
    return np.concatenate(out)


@_inference
def posterior_predictive(
    module: DiagVAE, data: ModalityData, n_samples: int = 1, batch_size: int = 1024
) -> np.ndarray:
    """Samples ``x ~ p(x|z)``, ``z ~ q(z|x)``: shape ``(n_samples, cells, features)``.

    Each cell keeps its own batch and library size; feature embeddings are their means.
    """
    device = next(module.parameters()).device
    v = feature_embeddings(module).to(device)
    out = []
    for idx in _minibatches(data.n_obs, batch_size):
        rows = data.rows(idx)
        x, b = rows["x"].to(device), rows["batch"].to(device)
        qz = module.encode(data.name, x)
        lib = x.sum(-1, keepdim=True)
        draws = [
            module.decode(data.name, qz.sample(), v, b, lib).sample() for _ in range(n_samples)
        ]
        out.append(torch.stack(draws).cpu().numpy())
    return np.concatenate(out, axis=1)


@_inference
def class_probabilities(module: DiagVAE, z: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Softmax of the classifier's logits on latent points ``z``: ``(cells, n_labels)``."""
    device = next(module.parameters()).device
    out = []
    for idx in _minibatches(len(z), batch_size):
        logits = module.classifier(torch.as_tensor(z[idx], device=device))
        out.append(torch.softmax(logits, -1).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


@torch.no_grad()
def knn_probabilities(
    reference: np.ndarray,
    labels: np.ndarray,
    query: np.ndarray,
    n_labels: int,
    k: int = 15,
    chunk: int = 1024,
) -> np.ndarray:
    """Fraction of each class among the ``k`` nearest reference points of every query point.

    Euclidean distances by :func:`torch.cdist`, ``chunk`` query points at a time.
    """
    ref = torch.as_tensor(reference, dtype=torch.float32)
    lab = torch.as_tensor(labels, dtype=torch.long)
    k = min(k, len(ref))
    out = []
    for idx in _minibatches(len(query), chunk):
        q = torch.as_tensor(query[idx], dtype=torch.float32)
        nearest = torch.cdist(q, ref).topk(k, largest=False).indices
        votes = torch.nn.functional.one_hot(lab[nearest], n_labels).sum(1)
        out.append((votes.double() / k).numpy())
    return np.concatenate(out)
