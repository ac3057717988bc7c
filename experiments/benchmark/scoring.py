"""All benchmark metrics of one embedding (and imputation) of one dataset."""

from __future__ import annotations

import numpy as np

from diagvi import metrics
from experiments.benchmark.baselines import dense, log_normalise
from experiments.benchmark.datasets import OTHER, BenchData

K = 15

#: name -> (higher is better, short description), in table order
METRICS: dict[str, tuple[bool, str]] = {
    "foscttm": (False, "FOSCTTM, mean of both directions (paired data)"),
    "transfer_accuracy": (True, "kNN label transfer, modality 0 -> 1, accuracy"),
    "transfer_macro_f1": (True, "kNN label transfer, modality 0 -> 1, macro-F1"),
    "classifier_accuracy": (True, "the model's own classifier, modality 1's cells, accuracy"),
    "unshared_transfer": (False, "fraction of modality 1 transferred to a type it lacks"),
    "mixing_asw": (True, "modality mixing, 1 - |batch ASW| (scIB)"),
    "mixing_entropy": (True, "modality mixing, kNN entropy / global entropy"),
    "celltype_asw": (True, "cell-type silhouette, (ASW + 1) / 2"),
    "graph_connectivity": (True, "scIB graph connectivity of cell types"),
    "nc_mean": (True, "neighbourhood conservation, mean over modalities"),
    "impute_pearson": (True, "imputation, mean per-feature Pearson (paired data)"),
    "impute_spearman": (True, "imputation, mean per-feature Spearman (paired data)"),
    "impute_decoder_pearson": (True, "diagvi's decoder imputation, mean per-feature Pearson"),
    "impute_decoder_spearman": (True, "diagvi's decoder imputation, mean per-feature Spearman"),
}


def _labelled(labels: np.ndarray | None) -> np.ndarray:
    if labels is None:
        return np.zeros(0, dtype=bool)
    return np.asarray(labels) != OTHER


def evaluate(
    ds: BenchData,
    latents: dict[str, np.ndarray],
    before: dict[str, np.ndarray],
    imputed: np.ndarray | None = None,
    imputed_decoder: np.ndarray | None = None,
    k: int = K,
    predicted: np.ndarray | None = None,
) -> dict[str, float]:
    """Every metric that ``ds`` supports (see :data:`METRICS`) for one run.

    Parameters
    ----------
    ds
        The dataset.
    latents
        ``{modality: joint embedding}``.
    before
        ``{modality: representation of that modality alone}`` (neighbourhood conservation).
    imputed
        Target-modality values for every source cell of ``ds.impute`` (any per-cell scale:
        it is log-normalised like the measured counts), or None.
    imputed_decoder
        A second imputation scored as ``impute_decoder_*`` (diagvi's decoder), or None.
    predicted
        The model's own classifier's label for every cell of modality 1 (trained on
        modality 0's labels), scored as ``classifier_accuracy``, or None.
    """
    a, b = ds.modalities
    out: dict[str, float] = {}
    if ds.pairs is not None:
        out["foscttm"] = metrics.foscttm(latents[a][ds.pairs[:, 0]], latents[b][ds.pairs[:, 1]])[
            "foscttm"
        ]
    la, lb = ds.labels[a], ds.labels[b]
    ka, kb = _labelled(la), _labelled(lb)
    if ka.any() and kb.any():
        scores = metrics.label_transfer(latents[a][ka], la[ka], latents[b][kb], lb[kb], k=k)
        out["transfer_accuracy"] = scores["accuracy"]
        out["transfer_macro_f1"] = scores["macro_f1"]
    if predicted is not None and kb.any():
        out["classifier_accuracy"] = float(np.mean(np.asarray(predicted)[kb] == lb[kb]))
    if ds.missing_type is not None:
        out["unshared_transfer"] = metrics.unshared_transfer_fraction(
            latents[a][ka], la[ka], latents[b], ds.missing_type, k=k
        )
    z = np.concatenate([latents[a], latents[b]])
    modality = np.repeat([0, 1], [len(latents[a]), len(latents[b])])
    groups = None
    if la is not None and lb is not None:
        groups = np.concatenate([la, lb]).astype(str)
    out["mixing_asw"] = metrics.modality_silhouette(z, modality, groups)
    out["mixing_entropy"] = metrics.knn_mixing_entropy(z, modality, k=k)
    parts = [(latents[m][keep], ds.labels[m][keep]) for m, keep in ((a, ka), (b, kb)) if keep.any()]
    if parts:
        zl = np.concatenate([p[0] for p in parts])
        ll = np.concatenate([p[1] for p in parts]).astype(str)
        if len(np.unique(ll)) > 1:
            out["celltype_asw"] = metrics.celltype_silhouette(zl, ll)
            out["graph_connectivity"] = metrics.graph_connectivity(zl, ll, k=k)
    nc = [metrics.neighbourhood_conservation(before[m], latents[m], k=k) for m in (a, b)]
    out["nc_mean"] = float(np.mean(nc))
    if ds.impute is not None and ds.pairs is not None and imputed is not None:
        source, target, features = ds.impute
        src_col, tgt_col = (0, 1) if source == a else (1, 0)
        var = ds.adatas[target].var_names
        cols = var.get_indexer(features)
        measured = log_normalise(dense(ds.adatas[target].layers["counts"]))
        for prefix, values in (("impute", imputed), ("impute_decoder", imputed_decoder)):
            if values is None:
                continue
            # a log1pnormal mean can fall in (-1, 0): as counts, below zero is zero
            predicted = log_normalise(np.clip(np.asarray(values, dtype=np.float64), 0, None))
            scores = metrics.imputation_scores(
                predicted[ds.pairs[:, src_col]][:, cols], measured[ds.pairs[:, tgt_col]][:, cols]
            )
            out[f"{prefix}_pearson"] = scores["pearson"]
            out[f"{prefix}_spearman"] = scores["spearman"]
    return out


def twin_transfer(ds: BenchData, z_ref: np.ndarray, k: int = K) -> dict[str, float]:
    """kNN label transfer if every cell of modality 1 sat exactly on its twin in modality 0.

    A perfect integration of paired data places query cell ``j`` where its twin ``i``
    (``ds.pairs``) is in ``z_ref``, a representation of modality 0's cells. What
    ``transfer_accuracy`` and ``unshared_transfer`` then score is how well modality 0's own
    neighbourhoods tell the types apart: a reference level, not a bound (an integration may
    place a cell where its neighbours vote better than its twin's). The twin itself is among
    its ``k`` nearest reference cells and votes.
    """
    if ds.pairs is None:
        raise ValueError(f"{ds.name} has no pairing: twin transfer needs paired cells")
    a, b = ds.modalities
    la, lb = ds.labels[a], ds.labels[b]
    ka = _labelled(la)
    query = np.full((ds.adatas[b].n_obs, z_ref.shape[1]), np.nan)
    query[ds.pairs[:, 1]] = z_ref[ds.pairs[:, 0]]
    twinned = ~np.isnan(query[:, 0])
    out: dict[str, float] = {}
    kb = _labelled(lb) & twinned if lb is not None else twinned[:0]
    if ka.any() and kb.any():
        scores = metrics.label_transfer(z_ref[ka], la[ka], query[kb], lb[kb], k=k)
        out["transfer_accuracy"] = scores["accuracy"]
    if ds.missing_type is not None:
        out["unshared_transfer"] = metrics.unshared_transfer_fraction(
            z_ref[ka], la[ka], query[twinned], ds.missing_type, k=k
        )
    return out
