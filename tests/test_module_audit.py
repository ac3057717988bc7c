"""Audit of the module's correlation terms and the classifier's evaluation statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diagvi import DIAGVI
from diagvi.components.classifiers import LinearClassifier
from diagvi.module import cross_moments, edge_correlations
from diagvi.synthetic import make_synthetic_pair


def direct_correlations(z, v, x) -> np.ndarray:
    """``corr(z @ v[j], x[:, j])`` over cells in float64; 0 for a constant column."""
    predicted = z.double() @ v.double().T
    predicted = predicted - predicted.mean(0)
    measured = x.double() - x.double().mean(0)
    scale = predicted.norm(dim=0) * measured.norm(dim=0)
    covariance = (predicted * measured).sum(0)
    return torch.where(scale > 0, covariance / scale.clamp_min(1e-300), 0.0).numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_cells", [2, 3, 17, 128])
def test_correlations_of_constant_and_nearly_constant_features(dtype, n_cells):
    # a latent away from the origin, and features constant in the minibatch at levels a
    # log1p-normalised or z-scored input takes: float32 gave correlations of thousands
    g = torch.Generator().manual_seed(n_cells)
    z = (torch.randn(n_cells, 4, generator=g) * 0.3 + torch.tensor([1.0, -2.0, 0.5, 3.0])).to(dtype)
    v = torch.randn(8, 4, generator=g).to(dtype)
    x = torch.rand(n_cells, 8, generator=g, dtype=dtype) * 3
    x[:, :5] = torch.tensor([7.3, -0.35, 2.5, 5.1, 1.0], dtype=dtype)
    x[:, 5] = 5.0 + 0.01 * torch.randn(n_cells, generator=g, dtype=dtype)  # CV 0.2 %
    corr = cross_moments(z, x).correlations(v)
    expected = direct_correlations(z, v, x)
    assert corr.dtype == dtype
    np.testing.assert_allclose(corr.numpy(), expected, atol=1e-4)
    assert float(corr.abs().max()) <= 1.0 + 1e-5
    gathered = edge_correlations(z, v[[3, 6]], x, torch.tensor([0, 6]))
    np.testing.assert_allclose(
        gathered.numpy(), direct_correlations(z, v[[3, 6]], x[:, [0, 6]]), atol=1e-4
    )


def test_self_and_link_terms_of_z_scored_input_with_genes_absent_from_the_minibatch():
    # z-scored data (normal likelihood): a gene that no cell of the minibatch detects is a
    # nonzero constant there; its correlation is 0, and each term lies in [0, 2]
    adatas, mapping = make_synthetic_pair(n_cells=60, n_genes=12, n_proteins=4)
    rna = adatas["rna"]
    counts = np.asarray(rna.X.todense(), dtype=np.float32)
    counts[:, [1, 5, 8, 10]] = 0.0
    counts[:3, [1, 5, 8, 10]] = [[4.0, 9.0, 1.0, 30.0]]  # rare genes: three cells only
    logged = np.log1p(counts)
    rna.X = ((logged - logged.mean(0)) / logged.std(0)).astype(np.float32)
    DIAGVI.setup_anndata(rna, likelihood="normal")
    DIAGVI.setup_anndata(adatas["protein"])
    model = DIAGVI(adatas, mapping_df=mapping, n_latent=4, seed=0)
    module = model.module.eval()
    rows = np.arange(3, 60)  # none of the three expressing cells
    x = {m: model.data[m].rows(rows)["x"] for m in adatas}
    with torch.no_grad():
        inputs = {m: module.transform(m, x[m]) for m in x}
        z = {m: module.encode(m, x[m]).loc for m in x}
        v = module.g2v().loc
        terms = {
            **module.self_consistency(z, inputs, v),
            **module.link_consistency(z, inputs, v),
        }
    own = module.feature_embedding("rna", v)
    expected = direct_correlations(z["rna"], own, inputs["rna"])
    assert expected[[1, 5, 8, 10]].tolist() == [0.0] * 4
    assert float(terms["self/rna"]) == pytest.approx(float(np.mean(1.0 - expected)), abs=1e-4)
    for name, value in terms.items():
        assert 0.0 <= float(value) <= 2.0, (name, float(value))


def test_classifier_evaluation_standardises_with_the_training_batches_statistics():
    # two training batches of a latent at 5 +- 0.1: evaluation standardised it with
    # (mean 0.95, variance 0.81), the starting (0, 1) still weighing 81 %
    torch.manual_seed(0)
    clf = LinearClassifier(n_latent=2, n_labels=3)
    labels = torch.arange(64) % 3
    for _ in range(2):
        clf.loss(5.0 + 0.1 * torch.randn(64, 2), labels)
    assert int(clf.norm.num_batches_tracked) == 2
    clf.eval()
    with torch.no_grad():
        standardised = clf.standardise(5.0 + 0.1 * torch.randn(4096, 2))
    np.testing.assert_allclose(standardised.mean(0).numpy(), 0.0, atol=0.15)
    np.testing.assert_allclose(standardised.std(0).numpy(), 1.0, atol=0.15)
    # after many batches the start weighs nothing: as BatchNorm's own evaluation
    clf.train()
    for _ in range(300):
        clf.loss(5.0 + 0.1 * torch.randn(64, 2), labels)
    clf.eval()
    z = 5.0 + 0.1 * torch.randn(16, 2)
    with torch.no_grad():
        torch.testing.assert_close(clf.standardise(z), clf.norm(z))
        # never trained: the starting statistics, as before
        fresh = LinearClassifier(n_latent=2, n_labels=3).eval()
        torch.testing.assert_close(fresh.standardise(z), fresh.norm(z))
