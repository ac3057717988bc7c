"""Metrics audit: non-finite embeddings and imputations, label kinds, missing labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from diagvi import metrics


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_knn_refuses_non_finite_embeddings(rng):
    ref = rng.normal(size=(6, 2))
    labels = np.array(["a", "a", "b", "b", "c", "c"])
    # every distance of a NaN row is NaN: its "neighbours" were arbitrary indices, and the
    # label transfer voted with them
    query = np.array([[np.nan, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="query has non-finite"):
        metrics.knn(query, ref, k=2)
    with pytest.raises(ValueError, match="query has non-finite"):
        metrics.label_transfer(ref, labels, query, np.array(["a", "b"]), k=3)
    bad = ref.copy()
    bad[2] = np.inf  # inf - inf is NaN
    with pytest.raises(ValueError, match="reference has non-finite"):
        metrics.knn_transfer(bad, labels, ref, k=2)
    with pytest.raises(ValueError, match="non-finite"):
        metrics.knn_mixing_entropy(bad, np.tile([0, 1], 3), k=2)
    with pytest.raises(ValueError, match="non-finite"):
        metrics.neighbourhood_conservation(ref, bad, k=2)


def test_label_transfer_refuses_numbers_against_strings():
    # the same classes, one side as strings: every comparison was False, accuracy 0
    z = np.array([[0.0], [1.0], [5.0]])
    with pytest.raises(ValueError, match="strings"):
        metrics.label_transfer(z, np.array(["1", "1", "2"]), z, np.array([1, 1, 2]), k=1)
    with pytest.raises(ValueError, match="strings"):
        metrics.classification_scores(np.array([1, 2]), np.array(["1", "2"]))
    # numbers of two kinds still compare by value (1.0 is 1)
    out = metrics.classification_scores(np.array([1, 2]), np.array([1.0, 2.0]))
    assert out == {"accuracy": 1.0, "macro_f1": 1.0}


def test_graph_connectivity_skips_missing_categorical_labels(rng):
    centres = np.array([[0.0, 0.0], [50.0, 50.0]])
    codes = np.repeat([0, 1], 10)
    x = centres[codes] + 0.1 * rng.normal(size=(20, 2))
    names = np.array(["a", "b"])[codes].astype(object)
    names[[0, 15]] = None  # unlabelled cells, as a categorical obs column holds them
    labels = pd.Categorical(names, categories=["a", "b", "unused"])
    # '<' between None (or NaN) and str raised a TypeError
    assert metrics.graph_connectivity(x, labels, k=3) == 1.0
    with_nan = pd.Series(names).to_numpy(dtype=object)
    with_nan[[0, 15]] = np.nan
    assert metrics.graph_connectivity(x, with_nan, k=3) == 1.0


def test_spearman_of_an_infinite_imputation_is_nan(rng):
    measured = rng.normal(size=(20, 2))
    imputed = measured.copy()
    imputed[0, 0] = np.inf  # ranked as the largest value: a finite spearman of 0.71
    for method in ("pearson", "spearman"):
        r = metrics.feature_correlations(imputed, measured, method)
        assert np.isnan(r[0])
        assert r[1] == pytest.approx(1.0)


def test_imputation_scores_nan_when_a_value_is_not_finite(rng):
    measured = rng.normal(size=(20, 3))
    imputed = measured.copy()
    imputed[4, 0] = np.nan  # its feature was skipped like a constant one: a perfect 1.0
    scores = metrics.imputation_scores(imputed, measured)
    assert np.isnan(scores["pearson"])
    assert np.isnan(scores["spearman"])
    # a constant feature is still skipped
    imputed = measured.copy()
    imputed[:, 0] = 2.0
    assert metrics.imputation_scores(imputed, measured) == {"pearson": 1.0, "spearman": 1.0}
