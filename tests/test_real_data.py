"""The Python API on a real CITE-seq pair (10x PBMC, 200 cells, RNA + 14 antibodies).

Uses ``../shared/data``, which sits beside the project and not in it: the tests skip cleanly
without it. The pair is given to the model as two unpaired modalities; the known pairing and
the protein-gated cell types only score the result.
"""

from __future__ import annotations

import numpy as np
import pytest

from diagvi import DIAGVI
from diagvi.metrics import foscttm, imputation_scores

datasets = pytest.importorskip("experiments.benchmark.datasets")
pytestmark = pytest.mark.skipif(
    not (datasets.DATA_DIR / "pbmc_10k_protein_v3_scvitest_rna.h5ad").is_file(),
    reason="needs ../shared/data (real datasets beside the project)",
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    bench = datasets.load("pbmc10k")
    rna, protein = bench.adatas["rna"], bench.adatas["protein"]
    rna.obs["cell_type"] = bench.labels["rna"]
    DIAGVI.setup_anndata(
        rna, layer="counts", labels_key="cell_type", unlabeled_category="other", likelihood="nb"
    )
    DIAGVI.setup_anndata(protein, layer="counts", likelihood="nb")
    model = DIAGVI({"rna": rna, "protein": protein}, mapping_df=bench.mapping, n_latent=10)
    model.train(max_epochs=150, batch_size=128, early_stopping=False, accelerator="cpu")
    return model, bench


def test_latents_align_better_than_chance(trained):
    model, _ = trained
    z = model.get_latent_representation()
    assert z["rna"].shape == (200, 10) and z["protein"].shape == (200, 10)
    assert all(np.isfinite(v).all() for v in z.values())
    assert foscttm(z["rna"], z["protein"])["foscttm"] < 0.4  # chance: 0.5


def test_protein_imputed_from_rna_follows_the_measured_protein(trained):
    model, bench = trained
    imputed = model.get_imputed_values(source_name="rna", target_libsize=None)
    measured = bench.adatas["protein"].layers["counts"].toarray()
    assert imputed.shape == measured.shape and (imputed >= 0).all()
    assert imputation_scores(np.log1p(imputed), np.log1p(measured))["spearman"] > 0.1


def test_label_transfer_and_reload(trained, tmp_path):
    model, bench = trained
    pred = model.predict_celltype(labeled_modality="rna", target_modality="protein")
    probs = pred["probabilities"]
    assert "other" not in probs.columns  # the unlabelled category is never predicted
    np.testing.assert_allclose(probs.to_numpy().sum(1), 1.0, rtol=1e-5)
    model.save(tmp_path / "m")
    again = DIAGVI.load(tmp_path / "m", adatas=bench.adatas)
    for m, z in model.get_latent_representation().items():
        np.testing.assert_array_equal(z, again.get_latent_representation()[m])
