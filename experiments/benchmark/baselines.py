"""Model-free pieces of the benchmark: normalisation, PCA, the joint-PCA baseline and kNN
imputation (generalised from ``experiments/demo_data/baseline_foscttm.py``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from diagvi.metrics import knn

TARGET_SUM = 1e4


def dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def log_normalise(counts: np.ndarray) -> np.ndarray:
    """``log1p(1e4 * x_ij / sum_j x_ij)``: counts per 10k of the cell's total, log1p."""
    library = counts.sum(1, keepdims=True)
    return np.log1p(counts / np.where(library > 0, library, 1.0) * TARGET_SUM)


def zscore(x: np.ndarray) -> np.ndarray:
    """Centre each column and divide by its standard deviation (constant columns: by 1)."""
    sd = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def pca(x: np.ndarray, n_comps: int) -> np.ndarray:
    """Scores of the top ``n_comps`` principal components of the column-centred ``x``."""
    centred = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    n = min(n_comps, len(s))
    return u[:, :n] * s[:n]


def modality_pca(counts, n_comps: int = 30) -> np.ndarray:
    """One modality on its own: log-normalise, z-score, PCA (``min(n_comps, n_features - 1)``).

    The "before integration" representation of the neighbourhood-conservation metric.
    """
    x = zscore(log_normalise(dense(counts)))
    return pca(x, min(n_comps, x.shape[1] - 1))


def linked_matrices(
    counts: dict[str, np.ndarray],
    var_names: dict[str, pd.Index],
    mapping: pd.DataFrame,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Two modalities over their linked features, column for column.

    The mapping is grouped by the modality with fewer distinct linked features (the
    antibodies of a CITE-seq table): each of its features is one column, and the other
    modality's column is the sum of the counts of the features linked to it (``CD8`` ->
    ``CD8A + CD8B``; several antibodies linked to one gene each get a copy of it). Each
    modality is normalised by its cells' totals over *all* its features (``log_normalise``),
    then z-scored per column.

    Returns
    -------
    ``(a, b, keys)`` in the order of ``counts``' modalities; ``keys`` the grouping features.
    """
    mod_a, mod_b = list(counts)
    key = min((mod_a, mod_b), key=lambda m: mapping[m].nunique())
    other = mod_b if key == mod_a else mod_a
    keys = list(dict.fromkeys(mapping[key]))
    cols: dict[str, list[np.ndarray]] = {mod_a: [], mod_b: []}
    for name in keys:
        linked = mapping.loc[mapping[key] == name, other]
        cols[key].append(counts[key][:, var_names[key].get_indexer([name])].sum(1))
        cols[other].append(counts[other][:, var_names[other].get_indexer(linked)].sum(1))
    out = []
    for m in (mod_a, mod_b):
        library = counts[m].sum(1, keepdims=True)
        scaled = np.stack(cols[m], axis=1) / np.where(library > 0, library, 1.0) * TARGET_SUM
        out.append(zscore(np.log1p(scaled)))
    return out[0], out[1], keys


def joint_pca(
    counts: dict[str, np.ndarray],
    var_names: dict[str, pd.Index],
    mapping: pd.DataFrame,
    n_comps: int = 20,
) -> dict[str, np.ndarray]:
    """Joint PCA baseline: stack both modalities' :func:`linked_matrices`, centre, PCA.

    ``min(n_comps, n_linked - 1)`` components; no model, no training. Returns
    ``{modality: embedding}``.
    """
    a, b, keys = linked_matrices(counts, var_names, mapping)
    emb = pca(np.vstack([a, b]), min(n_comps, len(keys) - 1))
    mod_a, mod_b = list(counts)
    return {mod_a: emb[: len(a)], mod_b: emb[len(a) :]}


def knn_impute(
    z_source: np.ndarray, z_target: np.ndarray, target_values: np.ndarray, k: int = 15
) -> np.ndarray:
    """Impute each source cell as the mean of its ``k`` nearest target cells' values.

    ``hat x_i = (1/k) sum_{j in N_k(i)} x_j`` with neighbours among the target modality's
    cells in the joint space: imputation for methods without a decoder.
    """
    idx = knn(z_source, z_target, k=k)
    return target_values[idx].mean(1)
