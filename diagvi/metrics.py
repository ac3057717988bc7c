"""Integration metrics as pure functions on arrays (numpy in, floats or arrays out).

Distances are Euclidean, computed by :func:`torch.cdist` in float64 on blocks of rows, so no
function builds an ``n x n`` matrix: memory is ``chunk x n`` with ``chunk`` chosen to keep a
block near 2**24 entries (128 MB) unless given. Formulas follow the cited definitions:
FOSCTTM (Liu et al. 2019, UnionCom), the scIB metrics (Luecken et al. 2022, Nat Methods 19:41:
ASW, batch ASW, graph connectivity) and kNN label transfer as in GLUE (Cao & Gao 2022).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components
from scipy.stats import rankdata

BLOCK_ENTRIES = 2**24


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def _chunk(n_columns: int, chunk: int | None) -> int:
    return chunk if chunk is not None else max(1, min(4096, BLOCK_ENTRIES // max(n_columns, 1)))


def _blocks(x: torch.Tensor, y: torch.Tensor, chunk: int | None):
    """Yield ``(start, cdist(x[start:start+c], y))`` over blocks of rows of ``x``."""
    c = _chunk(len(y), chunk)
    for start in range(0, len(x), c):
        # exact differences, not ||x||^2 + ||y||^2 - 2 x.y: that shortcut cancels for points far
        # from the origin and rounds differently per block, so ties (and kNN sets) would
        # depend on the chunk size
        d = torch.cdist(x[start : start + c], y, compute_mode="donot_use_mm_for_euclid_dist")
        yield start, d


def _check_length(name: str, values, n: int, of: str) -> None:
    """Raise a ValueError naming ``name`` unless it has one entry per row of ``of``."""
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but {of} has {n} rows")


def _codes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, codes)``: sorted unique labels and each row's index into them."""
    classes, codes = np.unique(np.asarray(labels), return_inverse=True)
    return classes, codes.ravel()


# ------------------------------------------------------------------ nearest neighbours


def knn(
    query: np.ndarray,
    reference: np.ndarray | None = None,
    k: int = 15,
    chunk: int | None = None,
) -> np.ndarray:
    """Indices of the ``k`` nearest reference rows of every query row, nearest first.

    With ``reference=None`` the query is its own reference and each row's own index is left
    out (``k`` neighbours besides itself). ``k`` is capped at the number of candidates.
    Raises a ValueError when either holds a non-finite value: every distance of such a row is
    NaN (``inf - inf`` too), and its neighbours would be arbitrary indices.

    Returns
    -------
    ``(n_query, k)`` integer array.
    """
    q = _tensor(query)
    self_ref = reference is None
    ref = q if self_ref else _tensor(reference)
    for name, t in (("query", q), ("reference", ref)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} has non-finite values (NaN or inf): no nearest neighbours")
    k = min(k, len(ref) - int(self_ref))
    out = np.empty((len(q), k), dtype=np.int64)
    for start, d in _blocks(q, ref, chunk):
        if self_ref:
            rows = torch.arange(len(d))
            d[rows, rows + start] = torch.inf
        out[start : start + len(d)] = d.topk(k, largest=False).indices.numpy()
    return out


def knn_graph(x: np.ndarray, k: int = 15, chunk: int | None = None) -> sp.csr_matrix:
    """Symmetric 0/1 adjacency of the kNN graph: ``A_ij = 1`` if j is among i's ``k`` nearest
    neighbours or i among j's (self excluded)."""
    idx = knn(x, k=k, chunk=chunk)
    n = len(x)
    rows = np.repeat(np.arange(n), idx.shape[1])
    a = sp.csr_matrix((np.ones(rows.size), (rows, idx.ravel())), shape=(n, n))
    return ((a + a.T) > 0).astype(np.float64).tocsr()


# ------------------------------------------------------------------ pairing


def _fraction_closer(x: torch.Tensor, y: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """For each row i of x: fraction of rows of y closer to x_i than its true match y_i,
    the others at the same distance counted half."""
    out = torch.empty(len(x), dtype=torch.float64)
    n = len(y)
    for start, d in _blocks(x, y, chunk):
        rows = torch.arange(len(d))
        true = d[rows, rows + start][:, None]
        ties = (d == true).sum(1).double() - 1.0  # the true match itself is no tie
        frac = ((d < true).sum(1).double() + ties / 2) / (n - 1)
        # a NaN distance compares False and would count as "not closer": a diverged
        # embedding would score as a perfect one
        frac[~torch.isfinite(d).all(1)] = torch.nan
        out[start : start + len(d)] = frac
    return out


def foscttm(x: np.ndarray, y: np.ndarray, chunk: int | None = None) -> dict[str, float]:
    """Fraction Of Samples Closer Than the True Match (Liu et al. 2019), both directions.

    Row ``i`` of ``x`` and row ``i`` of ``y`` are the same cell measured in two modalities.
    For cell ``i``, ``FOSCTTM_x(i) = (#{j : d(x_i, y_j) < d(x_i, y_i)} + T_i / 2) / (n - 1)``
    with ``T_i = #{j != i : d(x_i, y_j) = d(x_i, y_i)}``, and symmetrically ``FOSCTTM_y``;
    each direction is averaged over cells and ``foscttm`` is the mean of the two directions.
    0 is perfect, about 0.5 is random; NaN when an embedding holds non-finite values. Memory
    is ``chunk x n``, never ``n x n``.

    Ties count half: the expected fraction when they are broken at random. The usual strict
    count (Liu et al.; SCOT, GLUE) is the same for embeddings without ties, but scores a
    collapsed embedding (every distance equal) as perfect, 0, and credits an embedding with
    every cell that it places exactly on the true match (duplicate points) as if it had told
    them apart.

    Returns
    -------
    ``{"foscttm": mean of both directions, "foscttm_x": ..., "foscttm_y": ...}``
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"paired embeddings need equal numbers of rows, got {x.shape[0]} and {y.shape[0]}"
        )
    if x.shape[0] < 2:
        raise ValueError("FOSCTTM needs at least 2 paired cells")
    tx, ty = _tensor(x), _tensor(y)
    fx = _fraction_closer(tx, ty, chunk).mean().item()
    fy = _fraction_closer(ty, tx, chunk).mean().item()
    return {"foscttm": (fx + fy) / 2, "foscttm_x": fx, "foscttm_y": fy}


# ------------------------------------------------------------------ label transfer


def knn_transfer(
    z_ref: np.ndarray,
    labels_ref: np.ndarray,
    z_query: np.ndarray,
    k: int = 15,
    chunk: int | None = None,
) -> np.ndarray:
    """Label of every query row by majority vote of its ``k`` nearest reference rows.

    The vote of class ``c`` is ``#{j in N_k(i) : y_j = c}``; a tie goes to the tied class
    whose neighbours rank nearer, the larger ``sum_{j in N_k(i), y_j = c} (k - rank_j)``
    (rank 0 = nearest), as a distance weighting too small to overturn a vote would.
    """
    _check_length("labels_ref", labels_ref, len(z_ref), "z_ref")
    classes, codes = _codes(labels_ref)
    idx = knn(z_query, z_ref, k=k, chunk=chunk)
    k = idx.shape[1]
    rows = np.repeat(np.arange(len(idx)), k)
    cols = codes[idx].ravel()
    # integer key: one more vote always outweighs any rank sum (at most k (k + 1) / 2)
    key = np.zeros((len(idx), len(classes)), dtype=np.int64)
    np.add.at(key, (rows, cols), np.tile(k * (k + 1) // 2 + 1 + k - np.arange(k), len(idx)))
    return classes[key.argmax(1)]


def classification_scores(true: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 of predicted labels.

    ``accuracy = mean_i [pred_i = true_i]``; for each class ``c`` in the union of true and
    predicted labels, ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)``, and ``macro_f1`` is their
    unweighted mean (scikit-learn's ``f1_score(average="macro")``).
    """
    true, predicted = np.asarray(true), np.asarray(predicted)
    _check_length("predicted", predicted, len(true), "true")
    # a number never equals a string: labels 1 against "1" would score 0, not an error
    kinds = {true.dtype.kind, predicted.dtype.kind}
    if true.size and kinds & set("US") and kinds & set("biuf"):
        raise ValueError(
            f"true ({true.dtype}) and predicted ({predicted.dtype}) labels mix numbers and "
            "strings: convert both to one kind"
        )
    f1 = []
    for c in np.union1d(true, predicted):
        tp = np.sum((predicted == c) & (true == c))
        fp = np.sum((predicted == c) & (true != c))
        fn = np.sum((predicted != c) & (true == c))
        f1.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(true == predicted)), "macro_f1": float(np.mean(f1))}


def label_transfer(
    z_ref: np.ndarray,
    labels_ref: np.ndarray,
    z_query: np.ndarray,
    labels_query: np.ndarray,
    k: int = 15,
    chunk: int | None = None,
) -> dict[str, float]:
    """kNN label transfer from a labelled modality to the other, scored on its true labels.

    Labels of the query cells are predicted by :func:`knn_transfer` (``k`` nearest
    reference cells in the joint space) and scored by :func:`classification_scores`.

    Returns
    -------
    ``{"accuracy": ..., "macro_f1": ...}``
    """
    _check_length("labels_query", labels_query, len(z_query), "z_query")
    predicted = knn_transfer(z_ref, labels_ref, z_query, k=k, chunk=chunk)
    return classification_scores(labels_query, predicted)


def unshared_transfer_fraction(
    z_ref: np.ndarray,
    labels_ref: np.ndarray,
    z_query: np.ndarray,
    cell_type,
    k: int = 15,
    chunk: int | None = None,
) -> float:
    """Fraction of query cells transferred to a cell type the query modality lacks.

    ``cell_type`` is present in the reference only; the score is
    ``#{i : knn_transfer(i) = cell_type} / n_query`` (0 is best: an integration robust to
    composition differences does not pull other cells onto the unshared type).
    """
    # a cell type absent from the reference is never predicted: it would score a silent 0
    if not np.any(np.asarray(labels_ref) == cell_type):
        raise ValueError(f"cell_type {cell_type!r} is not among labels_ref")
    predicted = knn_transfer(z_ref, labels_ref, z_query, k=k, chunk=chunk)
    return float(np.mean(predicted == cell_type))


# ------------------------------------------------------------------ silhouettes and mixing


def silhouette_samples(x: np.ndarray, labels: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """Silhouette width of every row (Rousseeuw 1987), chunked.

    ``a_i`` is the mean distance from i to the other members of its cluster, ``b_i`` the
    smallest mean distance from i to the members of another cluster, and
    ``s_i = (b_i - a_i) / max(a_i, b_i)`` in ``[-1, 1]``; ``s_i = 0`` in a one-member cluster
    (scikit-learn's convention). Needs at least two clusters.
    """
    _check_length("labels", labels, len(x), "x")
    _, codes = _codes(labels)
    n_clusters = codes.max() + 1 if len(codes) else 0
    if n_clusters < 2:
        raise ValueError("the silhouette needs at least two clusters")
    onehot = torch.nn.functional.one_hot(torch.as_tensor(codes), n_clusters).double()
    counts = onehot.sum(0)
    own = torch.as_tensor(codes)
    out = torch.empty(len(codes), dtype=torch.float64)
    t = _tensor(x)
    for start, d in _blocks(t, t, chunk):
        sums = d @ onehot  # (rows, clusters) summed distances; the self-distance is 0
        o = own[start : start + len(d)]
        rows = torch.arange(len(d))
        a = sums[rows, o] / (counts[o] - 1).clamp(min=1)
        mean = sums / counts
        mean[rows, o] = torch.inf
        b = mean.min(1).values
        s = (b - a) / torch.maximum(a, b).clamp(min=1e-300)
        out[start : start + len(d)] = torch.where(counts[o] > 1, s, torch.zeros_like(s))
    return out.numpy()


def celltype_silhouette(z: np.ndarray, labels: np.ndarray, chunk: int | None = None) -> float:
    """Cell-type ASW scaled to ``[0, 1]`` (scIB): ``(mean_i s_i + 1) / 2``, 1 = compact types."""
    return float((silhouette_samples(z, labels, chunk).mean() + 1) / 2)


def modality_silhouette(
    z: np.ndarray,
    modality: np.ndarray,
    groups: np.ndarray | None = None,
    chunk: int | None = None,
) -> float:
    """Modality mixing by the scIB batch ASW: ``1 - |s_i|`` averaged, 1 = modalities mixed.

    Within each group ``g`` (a cell type; all cells form one group when ``groups`` is None)
    the silhouette ``s_i`` of the *modality* labels is computed on the group's cells, and
    ``score = mean_g mean_{i in g} (1 - |s_i|)``. Groups with cells of one modality only
    are skipped; NaN when every group is skipped.
    """
    z, modality = np.asarray(z), np.asarray(modality)
    _check_length("modality", modality, len(z), "z")
    groups = np.zeros(len(modality), dtype=int) if groups is None else np.asarray(groups)
    _check_length("groups", groups, len(z), "z")
    scores = []
    for g in np.unique(groups):
        sel = groups == g
        n_mod = len(np.unique(modality[sel]))
        if n_mod < 2 or n_mod == sel.sum():
            continue
        scores.append(np.mean(1 - np.abs(silhouette_samples(z[sel], modality[sel], chunk))))
    return float(np.mean(scores)) if scores else float("nan")


def knn_mixing_entropy(
    z: np.ndarray, modality: np.ndarray, k: int = 30, chunk: int | None = None
) -> float:
    """Modality mixing by the entropy of modality labels among each cell's ``k`` neighbours.

    With ``p_im`` the fraction of cell i's ``k`` nearest neighbours (self excluded) from
    modality ``m`` and ``P_m`` the fraction of all cells from ``m``, the score is
    ``mean_i H(p_i) / H(P)`` with ``H(p) = -sum_m p_m log p_m``: about 1 when neighbourhoods
    are as mixed as the whole data, 0 when every neighbourhood holds one modality.
    """
    _check_length("modality", modality, len(z), "z")
    _, codes = _codes(modality)
    n_mod = codes.max() + 1
    idx = knn(z, k=k, chunk=chunk)
    frac = np.stack([(codes[idx] == m).mean(1) for m in range(n_mod)], axis=1)
    overall = np.bincount(codes, minlength=n_mod) / len(codes)

    def entropy(p: np.ndarray) -> np.ndarray:
        return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)

    return float(entropy(frac).mean() / entropy(overall))


# ------------------------------------------------------------------ conservation


def neighbourhood_conservation(
    x_before: np.ndarray, z_after: np.ndarray, k: int = 15, chunk: int | None = None
) -> float:
    """Overlap of each cell's kNN set before and after integration (one modality).

    ``mean_i |N_k^before(i) ∩ N_k^after(i)| / k``, neighbours within the same cells (self
    excluded), ``x_before`` a representation of the modality alone (e.g. PCA of its
    log-normalised data) and ``z_after`` the same cells' joint latent. 1 = kept, ~k/n random.
    """
    _check_length("z_after", z_after, len(x_before), "x_before")
    before = knn(x_before, k=k, chunk=chunk)
    after = knn(z_after, k=k, chunk=chunk)
    shared = [np.intersect1d(b, a).size for b, a in zip(before, after, strict=True)]
    return float(np.mean(shared) / before.shape[1])


def graph_connectivity(
    z: np.ndarray, labels: np.ndarray, k: int = 15, chunk: int | None = None
) -> float:
    """scIB graph connectivity: ``mean_c |LCC(G_c)| / n_c``.

    ``G`` is the symmetric kNN graph of all cells (:func:`knn_graph`), ``G_c`` its subgraph
    on the ``n_c`` cells of type ``c`` and ``|LCC(G_c)|`` the size of its largest connected
    component; 1 = every cell type forms one connected piece. Cells labelled NaN or None are
    left out (as scIB iterates over the categories only).
    """
    labels = np.asarray(labels)
    _check_length("labels", labels, len(z), "z")
    graph = knn_graph(z, k=k, chunk=chunk)
    fractions = []
    # missing ones out before np.unique: it cannot sort None or NaN among strings (missing
    # labels of a categorical), and it keeps a float NaN, which selects no cell (NaN != NaN)
    for c in np.unique(labels[~pd.isna(labels)]):
        sel = np.flatnonzero(labels == c)
        _, comp = connected_components(graph[sel][:, sel], directed=False)
        fractions.append(np.bincount(comp).max() / sel.size)
    return float(np.mean(fractions))


# ------------------------------------------------------------------ imputation


def feature_correlations(
    imputed: np.ndarray, measured: np.ndarray, method: str = "pearson"
) -> np.ndarray:
    """Per-feature correlation across cells between imputed and measured values.

    ``pearson``: ``r_f = sum_i (u_if - mean u_f)(v_if - mean v_f) / (n sd(u_f) sd(v_f))``;
    ``spearman``: the same on within-feature ranks (ties averaged). NaN for a feature that
    is constant in either matrix or holds a non-finite value in either.
    """
    u, v = np.asarray(imputed, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if u.shape != v.shape:
        raise ValueError(f"imputed {u.shape} and measured {v.shape} differ in shape")
    # before ranking: ranks turn an inf into the largest value, and spearman would be finite
    nonfinite = ~(np.isfinite(u).all(0) & np.isfinite(v).all(0))
    if method == "spearman":
        u, v = rankdata(u, axis=0), rankdata(v, axis=0)
    elif method != "pearson":
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}")
    # constant from the values themselves: a rounded mean (0.1 repeated) leaves residues ~1e-17
    # after centring that would give a spurious finite r
    constant = (u == u[:1]).all(0) | (v == v[:1]).all(0)
    with np.errstate(invalid="ignore", divide="ignore"):  # inf - inf: masked as nonfinite
        u, v = u - u.mean(0), v - v.mean(0)
        denom = np.sqrt((u**2).sum(0) * (v**2).sum(0))
        return np.where(constant | nonfinite | ~(denom > 0), np.nan, (u * v).sum(0) / denom)


def imputation_scores(imputed: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """Mean over features of :func:`feature_correlations`, both methods.

    Constant features (NaN correlation) are skipped; NaN when any value is not finite.
    """
    # nanmean would skip a feature that is NaN for a non-finite value as if it were constant,
    # and score a partly diverged imputation on its other features
    if not (np.isfinite(imputed).all() and np.isfinite(measured).all()):
        return {"pearson": float("nan"), "spearman": float("nan")}
    return {
        m: float(np.nanmean(feature_correlations(imputed, measured, m)))
        for m in ("pearson", "spearman")
    }
