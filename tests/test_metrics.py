"""Integration metrics: hand-computed cases, perfect vs random, chunked == unchunked."""

from __future__ import annotations

import numpy as np
import pytest

from diagvi import metrics


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _clusters(rng, n_per: int = 40, n_types: int = 3, dim: int = 5, spread: float = 0.1):
    """Well separated Gaussian blobs and their labels."""
    centres = rng.normal(size=(n_types, dim)) * 5
    labels = np.repeat(np.arange(n_types), n_per)
    return centres[labels] + spread * rng.normal(size=(labels.size, dim)), labels


# ------------------------------------------------------------------ kNN


def test_knn_hand_computed():
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    assert metrics.knn(x, k=2).tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]
    ref = np.array([[0.0], [10.0]])
    assert metrics.knn(np.array([[2.0], [9.0]]), ref, k=1).tolist() == [[0], [1]]
    assert metrics.knn(x, k=10).shape == (4, 3)  # capped at n - 1 without self


def test_knn_chunked_equals_unchunked(rng):
    x = rng.normal(size=(57, 4))
    np.testing.assert_array_equal(metrics.knn(x, k=5, chunk=7), metrics.knn(x, k=5))


def test_knn_graph_is_symmetric_without_self_loops(rng):
    g = metrics.knn_graph(rng.normal(size=(30, 3)), k=3)
    assert (g != g.T).nnz == 0
    assert g.diagonal().sum() == 0
    assert (np.asarray(g.sum(1)).ravel() >= 3).all()


# ------------------------------------------------------------------ FOSCTTM


def test_foscttm_hand_computed():
    x = np.array([[0.0], [1.0], [2.0]])
    y = np.array([[0.0], [2.0], [1.0]])  # cells 1 and 2 are swapped in y
    # from x: cell 0 (true match at distance 0) -> 0; cell 1 (x=1, true y=2 at distance 1):
    # y_2 = 1 is closer and y_0 = 0 ties -> (1 + 1/2) / 2; cell 2 (x=2, true y=1 at distance
    # 1): y_1 = 2 closer -> 1/2; from y, symmetrically: 0, 1/2, 3/4
    out = metrics.foscttm(x, y)
    assert out["foscttm_x"] == pytest.approx(5 / 12)
    assert out["foscttm_y"] == pytest.approx(5 / 12)
    assert out["foscttm"] == pytest.approx(5 / 12)


def test_foscttm_perfect_random_and_symmetry(rng):
    x = rng.normal(size=(300, 8))
    assert metrics.foscttm(x, x)["foscttm"] == 0.0
    y = rng.normal(size=(300, 8))
    random = metrics.foscttm(x, y)
    assert random["foscttm"] == pytest.approx(0.5, abs=0.05)
    swapped = metrics.foscttm(y, x)
    assert swapped["foscttm_x"] == pytest.approx(random["foscttm_y"])
    assert swapped["foscttm"] == pytest.approx(random["foscttm"])


def test_foscttm_ties_count_half():
    # a collapsed embedding tells no cell from its twin: chance, not perfect
    zeros = np.zeros((10, 3))
    assert metrics.foscttm(zeros, zeros)["foscttm"] == pytest.approx(0.5)
    # cells 0-2 coincide in both modalities (duplicate points), cell 3 stands apart: each
    # of 0-2 ties with the other two (1 of 3 closer on average), cell 3 is exact
    x = np.array([[0.0], [0.0], [0.0], [5.0]])
    out = metrics.foscttm(x, x.copy())
    assert out["foscttm_x"] == pytest.approx((3 * (2 / 2) / 3 + 0) / 4)
    assert out["foscttm"] == pytest.approx(0.25)


def test_foscttm_chunked_equals_unchunked_and_validates(rng):
    x, y = rng.normal(size=(101, 3)), rng.normal(size=(101, 3))
    assert metrics.foscttm(x, y, chunk=8) == pytest.approx(metrics.foscttm(x, y, chunk=1000))
    with pytest.raises(ValueError, match="equal numbers"):
        metrics.foscttm(x, y[:-1])


def test_default_chunk_bounds_the_block():
    assert metrics._chunk(100_000, None) * 100_000 <= metrics.BLOCK_ENTRIES
    assert metrics._chunk(10, None) == 4096
    assert metrics._chunk(10, 3) == 3


# ------------------------------------------------------------------ label transfer


def test_knn_transfer_majority_and_tie_break():
    ref = np.array([[0.0], [1.0], [5.0], [6.0], [6.5]])
    labels = np.array(["a", "a", "b", "b", "b"])
    assert metrics.knn_transfer(ref, labels, np.array([[0.4], [5.9]]), k=3).tolist() == ["a", "b"]
    # k=2 at 3.2: a (dist 2.2) and b (dist 1.8): one vote each, the nearer (b) wins
    assert metrics.knn_transfer(ref[1:3], labels[1:3], np.array([[3.2]]), k=2).tolist() == ["b"]


def test_classification_scores_hand_computed():
    true = np.array(["a", "a", "b", "b"])
    pred = np.array(["a", "b", "b", "b"])
    # F1_a = 2*1/(2+0+1) = 2/3, F1_b = 2*2/(4+1+0) = 4/5
    out = metrics.classification_scores(true, pred)
    assert out["accuracy"] == pytest.approx(0.75)
    assert out["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    # a predicted class absent from the truth counts as F1 = 0 (as scikit-learn does)
    out = metrics.classification_scores(np.array(["a", "a"]), np.array(["a", "c"]))
    assert out["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_classification_scores_match_sklearn(rng):
    skm = pytest.importorskip("sklearn.metrics")
    true, pred = rng.integers(0, 4, 200), rng.integers(0, 5, 200)
    out = metrics.classification_scores(true, pred)
    assert out["macro_f1"] == pytest.approx(skm.f1_score(true, pred, average="macro"))
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(true, pred))


def test_label_transfer_perfect_vs_random(rng):
    x, labels = _clusters(rng)
    query = x + 0.01 * rng.normal(size=x.shape)
    good = metrics.label_transfer(x, labels, query, labels, k=5)
    assert good == {"accuracy": 1.0, "macro_f1": 1.0}
    bad = metrics.label_transfer(x, labels, rng.normal(size=x.shape) * 5, labels, k=5)
    assert bad["accuracy"] < 0.6


def test_unshared_transfer_fraction(rng):
    x, labels = _clusters(rng)
    query = x[labels != 2] + 0.01 * rng.normal(size=(int((labels != 2).sum()), x.shape[1]))
    assert metrics.unshared_transfer_fraction(x, labels, query, 2, k=5) == 0.0
    assert metrics.unshared_transfer_fraction(x, labels, x[labels == 2], 2, k=5) == 1.0


# ------------------------------------------------------------------ silhouettes and mixing


def test_silhouette_hand_computed():
    x = np.array([[0.0], [1.0], [4.0], [6.0]])
    labels = np.array([0, 0, 1, 1])
    # s_0: a=1, b=(4+6)/2=5 -> 0.8;  s_1: a=1, b=(3+5)/2=4 -> 0.75
    # s_2: a=2, b=(4+3)/2=3.5 -> 1.5/3.5; s_3: a=2, b=(6+5)/2=5.5 -> 3.5/5.5
    expected = [0.8, 0.75, 1.5 / 3.5, 3.5 / 5.5]
    np.testing.assert_allclose(metrics.silhouette_samples(x, labels), expected)
    np.testing.assert_allclose(metrics.silhouette_samples(x, labels, chunk=1), expected)
    assert metrics.silhouette_samples(x, np.array([0, 0, 0, 1]))[3] == 0.0  # singleton


def test_silhouette_matches_sklearn(rng):
    skm = pytest.importorskip("sklearn.metrics")
    x, labels = rng.normal(size=(90, 4)), rng.integers(0, 3, 90)
    np.testing.assert_allclose(
        metrics.silhouette_samples(x, labels, chunk=16),
        skm.silhouette_samples(x, labels),
        atol=1e-9,
    )


def test_celltype_silhouette_separated_vs_random(rng):
    x, labels = _clusters(rng)
    assert metrics.celltype_silhouette(x, labels) > 0.9
    assert metrics.celltype_silhouette(x, rng.permutation(labels)) == pytest.approx(0.5, abs=0.1)


def test_mixing_scores_mixed_vs_separated(rng):
    x, labels = _clusters(rng)
    modality = np.tile([0, 1], len(x) // 2)  # both modalities in every cluster: mixed
    separated = x + np.where(modality[:, None] == 1, 100.0, 0.0)
    assert metrics.modality_silhouette(x, modality) > 0.9
    assert metrics.modality_silhouette(x, modality, groups=labels) > 0.9
    assert metrics.modality_silhouette(separated, modality) < 0.1
    assert metrics.knn_mixing_entropy(x, modality, k=10) > 0.8
    assert metrics.knn_mixing_entropy(separated, modality, k=10) == 0.0
    # a group with one modality only is skipped; all skipped -> NaN
    assert np.isnan(metrics.modality_silhouette(x, modality, groups=np.arange(len(x))))


def test_knn_mixing_entropy_hand_computed():
    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    modality = np.array(["a", "b", "a", "b"])
    # k=1: nearest neighbours 1, 0 (tie with 2, lower index), 1, 2: each neighbourhood is
    # pure -> entropy 0; k=3: every cell sees 2 of the other modality and 1 of its own
    assert metrics.knn_mixing_entropy(x, modality, k=1) == 0.0
    p = np.array([1 / 3, 2 / 3])
    assert metrics.knn_mixing_entropy(x, modality, k=3) == pytest.approx(
        -(p * np.log(p)).sum() / np.log(2)
    )


# ------------------------------------------------------------------ conservation


def test_neighbourhood_conservation(rng):
    x = rng.normal(size=(80, 6))
    assert metrics.neighbourhood_conservation(x, x * 3 + 1, k=5) == 1.0
    random = metrics.neighbourhood_conservation(x, rng.normal(size=(80, 6)), k=5)
    assert random < 0.2  # chance is k / (n - 1) ~ 0.06


def test_graph_connectivity(rng):
    x, labels = _clusters(rng)
    assert metrics.graph_connectivity(x, labels, k=5) == 1.0
    # cell type 0 split into two far halves: its largest component holds half of its cells
    split = x.copy()
    split[:20] += 1000
    assert metrics.graph_connectivity(split, labels, k=5) == pytest.approx((0.5 + 1 + 1) / 3)


# ------------------------------------------------------------------ imputation


def test_feature_correlations_hand_computed_and_invariances(rng):
    measured = rng.normal(size=(50, 4))
    imputed = measured * np.array([2.0, -1.0, 0.5, 1.0]) + np.array([1.0, 0, 0, 0])
    imputed[:, 3] = 7.0  # constant: undefined
    r = metrics.feature_correlations(imputed, measured)
    np.testing.assert_allclose(r[:3], [1, -1, 1])
    assert np.isnan(r[3])
    # spearman is invariant to monotone transforms, pearson is not
    mono = np.exp(3 * measured)
    np.testing.assert_allclose(metrics.feature_correlations(mono, measured, "spearman"), 1.0)
    assert (metrics.feature_correlations(mono, measured) < 1).all()
    scores = metrics.imputation_scores(imputed, measured)
    assert scores["pearson"] == pytest.approx(1 / 3)


def test_feature_correlations_match_scipy(rng):
    from scipy import stats

    u, v = rng.normal(size=(40, 3)), rng.poisson(2, size=(40, 3)).astype(float)
    r = metrics.feature_correlations(u, v, "spearman")
    expected = [stats.spearmanr(u[:, f], v[:, f]).statistic for f in range(3)]
    np.testing.assert_allclose(r, expected)
    with pytest.raises(ValueError, match="shape"):
        metrics.feature_correlations(u, v[:-1])


# ------------------------------------------------------------------ audit: edge cases


def _brute_foscttm(x, y):
    """FOSCTTM from explicit pairwise differences (no Gram-matrix shortcut), ties half."""
    d = np.sqrt(((x[:, None] - y[None]) ** 2).sum(-1))
    true = np.diag(d)[:, None]
    n = len(x)

    def fraction(d):
        return (((d < true).sum(1) + ((d == true).sum(1) - 1) / 2) / (n - 1)).mean()

    return fraction(d), fraction(d.T)


def test_foscttm_exact_far_from_the_origin(rng):
    # small distances between points far from the origin: ||x||^2 + ||y||^2 - 2 x.y cancels
    x = 1e4 + 1e-3 * rng.normal(size=(200, 5))
    y = x + 5e-4 * rng.normal(size=x.shape)
    fx, fy = _brute_foscttm(x, y)
    out = metrics.foscttm(x, y)
    assert out["foscttm_x"] == pytest.approx(fx)
    assert out["foscttm_y"] == pytest.approx(fy)


def test_foscttm_non_finite_is_nan_not_perfect(rng):
    x = rng.normal(size=(10, 2))
    y = x.copy()
    y[3] = np.nan  # a diverged embedding must not score as a perfect one
    assert np.isnan(metrics.foscttm(x, y)["foscttm"])


def test_knn_with_tied_distances_does_not_depend_on_chunk():
    for seed in range(5):
        x = np.repeat(np.random.default_rng(seed).normal(size=(40, 3)), 5, axis=0)
        full = metrics.knn(x, k=6)
        for chunk in (1, 3, 7):
            np.testing.assert_array_equal(metrics.knn(x, k=6, chunk=chunk), full)


def test_knn_transfer_tie_goes_to_the_class_ranked_nearer():
    # k=5 from 0: a (ranks 0, 4), b (ranks 1, 2), c: a and b tie at 2 votes; b's rank sum
    # (5 - 1) + (5 - 2) = 7 beats a's (5 - 0) + (5 - 4) = 6
    ref = np.array([[1.0], [2.0], [3.0], [4.0], [5.0]])
    labels = np.array(["a", "b", "b", "c", "a"])
    assert metrics.knn_transfer(ref, labels, np.array([[0.0]]), k=5).tolist() == ["b"]
    # ranks 0 and 3 against 1 and 2: equal sums, the first class in sorted order
    labels = np.array(["a", "b", "b", "a", "c"])
    assert metrics.knn_transfer(ref, labels, np.array([[0.0]]), k=4).tolist() == ["a"]


def test_knn_transfer_majority_wins_for_large_k():
    # 1499 'a' nearest, 1501 'b' farther: b has the majority whatever the ranks
    ref = np.arange(1.0, 3001.0)[:, None]
    labels = np.repeat(["a", "b"], [1499, 1501])
    assert metrics.knn_transfer(ref, labels, np.array([[0.0]]), k=3000).tolist() == ["b"]


def test_feature_correlations_constant_with_inexact_mean(rng):
    measured = rng.normal(size=(50, 2))
    imputed = measured.copy()
    imputed[:, 1] = 0.1  # np.full(50, 0.1).mean() != 0.1
    for method in ("pearson", "spearman"):
        r = metrics.feature_correlations(imputed, measured, method)
        assert r[0] == pytest.approx(1.0)
        assert np.isnan(r[1])
    assert metrics.imputation_scores(imputed, measured)["pearson"] == pytest.approx(1.0)


def test_graph_connectivity_skips_nan_labels(rng):
    x, labels = _clusters(rng)
    labels = labels.astype(float)
    labels[:5] = np.nan  # unlabelled cells are left out, as scIB does
    assert metrics.graph_connectivity(x, labels, k=5) == 1.0


def test_unshared_transfer_fraction_rejects_unknown_cell_type(rng):
    x, labels = _clusters(rng)
    with pytest.raises(ValueError, match="cell_type"):
        metrics.unshared_transfer_fraction(x, labels, x, "2", k=5)  # labels are ints


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda x, lab: metrics.silhouette_samples(x, lab[:-1]), "labels"),
        (lambda x, lab: metrics.celltype_silhouette(x, lab[:-1]), "labels"),
        (lambda x, lab: metrics.modality_silhouette(x, lab[:-1]), "modality"),
        (lambda x, lab: metrics.modality_silhouette(x, lab, groups=lab[:-1]), "groups"),
        (lambda x, lab: metrics.knn_mixing_entropy(x, np.append(lab, 0)), "modality"),
        (lambda x, lab: metrics.graph_connectivity(x, lab[:-1]), "labels"),
        (lambda x, lab: metrics.knn_transfer(x, np.append(lab, 0), x), "labels_ref"),
        (lambda x, lab: metrics.label_transfer(x, lab, x, lab[:-1]), "labels_query"),
        (lambda x, lab: metrics.classification_scores(lab, lab[:-1]), "predicted"),
        (lambda x, lab: metrics.neighbourhood_conservation(x, x[:-1]), "z_after"),
    ],
)
def test_mismatched_lengths_raise(rng, call, name):
    x, labels = _clusters(rng, n_per=10)
    with pytest.raises(ValueError, match=name):
        call(x, labels % 2)
