"""A synthetic pair of modalities with known pairing, labels and feature links, for tests."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def make_synthetic_pair(
    n_cells: int = 600,
    n_genes: int = 120,
    n_proteins: int = 24,
    n_types: int = 4,
    n_dims: int = 4,
    seed: int = 0,
) -> tuple[dict[str, ad.AnnData], pd.DataFrame]:
    """RNA counts and protein counts of the same cells, generated from one latent state.

    Cells of ``n_types`` types sit around type centres in an ``n_dims``-dimensional state;
    gene and protein loadings are random, and protein ``k`` shares the loadings of gene ``k``
    (the link recorded in the returned mapping table), so the guidance graph is informative.
    Row ``i`` of both modalities is the same cell (``obs_names`` equal), giving ground truth
    for FOSCTTM. Labels are in ``obs["cell_type"]``; RNA is sparse CSR, protein dense.

    Returns
    -------
    ``({"rna": AnnData, "protein": AnnData}, mapping)`` with mapping columns ``protein, rna``.
    """
    rng = np.random.default_rng(seed)
    types = rng.integers(n_types, size=n_cells)
    centres = rng.normal(scale=2.0, size=(n_types, n_dims))
    state = centres[types] + rng.normal(scale=0.5, size=(n_cells, n_dims))
    gene_loadings = rng.normal(size=(n_genes, n_dims))
    protein_loadings = gene_loadings[:n_proteins] + rng.normal(scale=0.2, size=(n_proteins, n_dims))

    def counts(loadings: np.ndarray, depth: float) -> np.ndarray:
        logits = state @ loadings.T
        rate = np.exp(logits - logits.max(1, keepdims=True))
        rate /= rate.sum(1, keepdims=True)
        library = depth * rng.lognormal(sigma=0.3, size=(n_cells, 1))
        theta = 5.0
        return rng.poisson(rng.gamma(theta, rate * library / theta)).astype(np.float32)

    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([f"type_{t}" for t in types])},
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    genes = [f"gene_{g}" for g in range(n_genes)]
    proteins = [f"protein_{p}" for p in range(n_proteins)]
    rna = ad.AnnData(
        sp.csr_matrix(counts(gene_loadings, 2000.0)), obs=obs.copy(), var=pd.DataFrame(index=genes)
    )
    protein = ad.AnnData(
        counts(protein_loadings, 1000.0), obs=obs.copy(), var=pd.DataFrame(index=proteins)
    )
    mapping = pd.DataFrame({"protein": proteins, "rna": genes[:n_proteins]})
    return {"rna": rna, "protein": protein}, mapping
