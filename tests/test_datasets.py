"""The bundled demo dataset loads, is consistent with itself and matches its documentation."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from diagvi.datasets import DEMO_DIR, DEMO_FILES, load_demo

# documented in diagvi/datasets/__init__.py and experiments/demo_data/README.md
N_CELLS = 500
N_GENES = 2020
N_HVG = 2000
N_PROTEINS = 47
N_LINKS = 52
UNMAPPED = {"CD138", "CD66b", "CD77", "EpCAM (CD326)", "Siglec-8"}
MAX_TOTAL_BYTES = 3 * 1024 * 1024
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def demo() -> tuple[dict[str, ad.AnnData], pd.DataFrame]:
    return load_demo()


def _dense(x) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def test_returns_two_anndata_and_table(demo):
    adatas, mapping = demo
    assert set(adatas) == {"rna", "protein"}
    assert all(isinstance(a, ad.AnnData) for a in adatas.values())
    assert isinstance(mapping, pd.DataFrame)
    assert list(mapping.columns) == ["protein", "rna"]


def test_same_cells_same_order(demo):
    adatas, _ = demo
    assert adatas["rna"].obs_names.equals(adatas["protein"].obs_names)
    assert adatas["rna"].obs_names.is_unique


def test_shapes_as_documented(demo):
    adatas, mapping = demo
    assert adatas["rna"].shape == (N_CELLS, N_GENES)
    assert adatas["protein"].shape == (N_CELLS, N_PROTEINS)
    assert int(adatas["rna"].var["highly_variable"].sum()) == N_HVG
    assert len(mapping) == N_LINKS


@pytest.mark.parametrize("modality", ["rna", "protein"])
def test_integer_nonnegative_counts(demo, modality):
    adata = demo[0][modality]
    x = _dense(adata.X)
    assert np.all(x >= 0)
    assert np.array_equal(x, np.round(x))
    assert adata.var_names.is_unique
    # no all-zero features, no empty cells
    assert np.all(x.sum(axis=0) > 0)
    assert np.all(x.sum(axis=1) > 0)


def test_rna_is_csr(demo):
    assert sp.issparse(demo[0]["rna"].X) and demo[0]["rna"].X.format == "csr"


def test_mapping_entries_in_var_names(demo):
    adatas, mapping = demo
    assert not mapping.duplicated().any()
    assert set(mapping["protein"]) <= set(adatas["protein"].var_names)
    assert set(mapping["rna"]) <= set(adatas["rna"].var_names)
    # every linked gene is kept in the RNA even when it is not highly variable
    unlinked = set(adatas["protein"].var_names) - set(mapping["protein"])
    assert unlinked == UNMAPPED


def test_no_isotype_controls(demo):
    names = set(demo[0]["protein"].var_names)
    assert not names & {"IgG1", "IgG2a"}
    assert not any(n.startswith("HTO") for n in names)


def test_files_small(demo):
    total = sum((DEMO_DIR / DEMO_FILES[k]).stat().st_size for k in ("rna", "protein"))
    assert total < MAX_TOTAL_BYTES


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not available")
def test_demo_matches_source(demo):
    adatas, _ = demo
    rna_src = ad.read_h5ad(SHARED_DATA / "eccite_citefuse_rna.h5ad")
    adt_src = ad.read_h5ad(SHARED_DATA / "eccite_citefuse_adt.h5ad")
    rna, protein = adatas["rna"], adatas["protein"]
    assert rna.obs_names.equals(rna_src.obs_names)
    src = _dense(rna_src[:, rna.var_names].X)
    assert np.array_equal(src, _dense(rna.X))
    src = _dense(adt_src[:, protein.var_names].X)
    assert np.array_equal(src, _dense(protein.X))
