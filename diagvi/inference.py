"""Inference over all cells of a modality, in order, in minibatches (no gradients).

Cells are read in row order, so data on disk (:mod:`diagvi.stream`) are read sequentially,
chunk by chunk. With ``out=`` a result is written to an ``.npy`` file minibatch by minibatch
and returned as a read-only memmap, so it is never held in memory.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from diagvi.data import ModalityData
from diagvi.metrics import knn
from diagvi.module import DiagVAE
from diagvi.stream import row_writer

# a kNN block (query rows x reference rows) holds at most this many float32 distances (64 MB)
KNN_BLOCK_ENTRIES = 2**24


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
    module: DiagVAE,
    data: ModalityData,
    batch_size: int = 1024,
    give_mean: bool = True,
    out: str | Path | None = None,
) -> np.ndarray:
    """Posterior mean (or one sample) of ``z`` for every cell of ``data``, in row order.

    ``out``: an ``.npy`` path to write the result to as it is computed (returned as a
    read-only memmap); ``None`` returns an in-memory array.
    """
    device = next(module.parameters()).device
    writer = row_writer(out, data.n_obs)
    for idx in _minibatches(data.n_obs, batch_size):
        rows = data.rows(idx)
        qz = module.encode(data.name, rows["x"].to(device))
        writer.write((qz.loc if give_mean else qz.sample()).cpu().numpy())
    return writer.result()


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
    out: str | Path | None = None,
) -> np.ndarray:
    """Mean of ``p(x_target | z)`` for the source cells, ``z`` their posterior mean.

    The source cells are encoded by the source modality's encoder; ``z`` is decoded by the
    *target* modality's decoder and likelihood with the target's mean feature embeddings
    (computed once), batch codes ``batch`` and library sizes ``library`` (one per cell).
    ``out``: an ``.npy`` path to write the result to as it is computed (read-only memmap).
    """
    device = next(module.parameters()).device
    v = feature_embeddings(module).to(device)
    writer = row_writer(out, source.n_obs)
    for idx in _minibatches(source.n_obs, batch_size):
        x = source.rows(idx)["x"].to(device)
        z = module.encode(source.name, x).loc
        b = torch.as_tensor(batch[idx], dtype=torch.long, device=device)
        lib = torch.as_tensor(library[idx], dtype=torch.float32, device=device).unsqueeze(-1)
        writer.write(module.decode(target, z, v, b, lib).mean.cpu().numpy())
    return writer.result()


def knn_imputed_values(
    z_source: np.ndarray,
    z_target: np.ndarray,
    target: ModalityData,
    library: np.ndarray | None,
    k: int = 15,
    batch_size: int = 1024,
    out: str | Path | None = None,
    candidates: np.ndarray | None = None,
) -> np.ndarray:
    """The measured target values of each source cell's ``k`` nearest target cells, averaged.

    Neighbours are found in the joint latent space (``z_source`` among ``z_target``, rows of
    ``target``). With ``library`` (count data), each neighbour's profile is divided by its
    total count first and the mean is scaled to the cell's ``library``:
    ``hat x_i = library_i / k * sum_{j in N_k(i)} x_j / sum(x_j)``; without, the values are
    averaged as they are. ``candidates``: the target rows allowed as neighbours (default all).
    ``batch_size`` source cells at a time, their neighbour rows read at most ``batch_size`` at
    a time (a block's neighbours are up to ``batch_size * k`` distinct cells), so backed target
    data stay on disk and memory stays near the result's block.
    """
    if candidates is None:
        neighbours = knn(z_source, z_target, k=k)
    else:
        neighbours = candidates[knn(z_source, z_target[candidates], k=k)]
    k = neighbours.shape[1]
    writer = row_writer(out, len(z_source))
    for idx in _minibatches(len(z_source), batch_size):
        rows, inverse = np.unique(neighbours[idx], return_inverse=True)
        # the mean as a product with weights 1/k: gathering each cell's neighbour rows first
        # would hold k times the result's block (cells x k x features); so would reading all
        # of the block's distinct neighbours at once, hence pieces of batch_size rows
        cells = np.repeat(np.arange(len(idx)), k)
        weights = sp.csc_matrix(
            (np.full(cells.size, 1.0 / k), (cells, inverse.ravel())), shape=(len(idx), len(rows))
        )
        mean = np.zeros((len(idx), target.n_vars))
        for piece in _minibatches(len(rows), batch_size):
            x = target.rows(rows[piece])["x"].numpy().astype(np.float64)
            if library is not None:
                x /= np.maximum(x.sum(1, keepdims=True), 1e-12)
            mean += weights[:, piece[0] : piece[-1] + 1] @ x
        writer.write((mean if library is None else mean * library[idx, None]).astype(np.float32))
    return writer.result()


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
    chunk: int | None = None,
) -> np.ndarray:
    """Fraction of each class among the ``k`` nearest reference points of every query point.

    Euclidean distances by :func:`torch.cdist`, ``chunk`` query points at a time; by default
    1024, fewer when the reference is so large that a block would pass
    :data:`KNN_BLOCK_ENTRIES` distances (memory stays bounded; time grows as query x reference).
    """
    ref = torch.as_tensor(reference, dtype=torch.float32)
    lab = torch.as_tensor(labels, dtype=torch.long)
    k = min(k, len(ref))
    if chunk is None:
        chunk = max(1, min(1024, KNN_BLOCK_ENTRIES // max(len(ref), 1)))
    out = np.empty((len(query), n_labels), dtype=np.float64)
    for idx in _minibatches(len(query), chunk):
        q = torch.as_tensor(np.asarray(query[idx]), dtype=torch.float32)
        nearest = torch.cdist(q, ref).topk(k, largest=False).indices
        votes = torch.nn.functional.one_hot(lab[nearest], n_labels).sum(1)
        out[idx] = (votes.double() / k).numpy()
    return out
