"""Build the demo dataset shipped in ``diagvi/datasets/``.

Source: the 500-cell ECCITE-seq PBMC subset (Mimitou et al. 2019, Nature Methods,
GEO GSE126310) as redistributed in the CiteFuse R package, stored beside the project
as ``../shared/data/eccite_citefuse_{rna,adt}.h5ad``. The two modalities were measured
in the same cells, so row i of one is row i of the other: the demo treats them as
unpaired for training and uses the pairing only to score alignments.

What this script does, deterministically (running it twice gives the same files):

1. Reads raw integer counts of both modalities and checks that the cells match.
2. Protein: drops the isotype controls (IgG1, IgG2a); hashtag counts live in the
   source ``obs`` and are dropped with it. Every other antibody is kept, linked or not.
3. RNA: drops genes with zero counts, log-normalises (counts per 10k, log1p) and picks
   the ``N_HVG`` most variable genes by dispersion (variance / mean) z-scored within
   20 bins of mean expression (Seurat-style), among genes detected in at least
   ``MIN_CELLS`` cells. Keeps the union of those genes and every gene the curated
   protein -> gene table links to, in the source gene order.
4. Writes ``demo_rna.h5ad`` (CSR float32 counts), ``demo_protein.h5ad`` (dense
   float32 counts), both gzip-compressed, and ``demo_protein_to_gene.csv`` (the rows of
   ``PROTEIN_TO_GENE`` whose gene is in the saved RNA data).

Run from the repository root::

    .venv/bin/python experiments/demo_data/make_demo.py [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"
DEFAULT_OUT_DIR = REPO / "diagvi" / "datasets"
SOURCE = "eccite_citefuse"
N_HVG = 2000
MIN_CELLS = 3
TARGET_SUM = 1e4
ISOTYPE_CONTROLS = ("IgG1", "IgG2a")

# Curated antibody -> gene links for the ECCITE-seq panel, from CD nomenclature (HCDM)
# and HGNC symbols. An antibody against a multi-chain complex links to every chain
# gene; isoform-specific antibodies (CD45RA, CD45RO, B220) link to the one gene.
# Rows whose gene is absent from (or has no counts in) the RNA data are dropped when
# the table is written; the script prints them.
PROTEIN_TO_GENE: dict[str, tuple[str, ...]] = {
    "B220 (CD45R)": ("PTPRC",),  # CD45R = CD45RABC isoform of PTPRC
    "B7-H1 (PD-L1)": ("CD274",),  # PD-L1 = CD274
    "C-kit (CD117)": ("KIT",),
    "CCR7": ("CCR7",),  # CD197
    "CD11b": ("ITGAM",),
    "CD11c": ("ITGAX",),
    "CD138": ("SDC1",),  # syndecan-1
    "CD14": ("CD14",),
    "CD16": ("FCGR3A", "FCGR3B"),  # CD16a and CD16b
    "CD19": ("CD19",),
    "CD1a": ("CD1A",),
    "CD2": ("CD2",),
    "CD223 (lag3)": ("LAG3",),
    "CD24": ("CD24",),
    "CD26 (Adenosine)": ("DPP4",),  # CD26 = DPP4 (adenosine deaminase complexing protein 2)
    "CD27": ("CD27",),
    "CD28": ("CD28",),
    "CD3": ("CD3D", "CD3E", "CD3G"),  # the CD3 complex: delta, epsilon, gamma chains
    "CD34": ("CD34",),
    "CD366 (tim3)": ("HAVCR2",),
    "CD4": ("CD4",),
    "CD44": ("CD44",),
    "CD45": ("PTPRC",),
    "CD45RA": ("PTPRC",),
    "CD45RO": ("PTPRC",),
    "CD5": ("CD5",),
    "CD56": ("NCAM1",),
    "CD62L": ("SELL",),
    "CD66b": ("CEACAM8",),
    "CD69": ("CD69",),
    "CD7": ("CD7",),
    "CD77": ("A4GALT",),  # Gb3 glycolipid; HCDM names its synthase A4GALT
    "CD8": ("CD8A", "CD8B"),  # CD8 alpha and beta chains
    "CTLA4": ("CTLA4",),  # CD152
    "EpCAM (CD326)": ("EPCAM",),
    "HLA-A,B,C": ("HLA-A", "HLA-B", "HLA-C"),  # pan MHC class I heavy chains
    "IL7Ralpha (CD127)": ("IL7R",),
    "LAMP1": ("LAMP1",),  # CD107a
    "MHCII (HLA-DR)": ("HLA-DRA", "HLA-DRB1", "HLA-DRB5"),  # HLA-DR alpha and beta chains
    "Ox40 (CD134)": ("TNFRSF4",),
    "PD-1 (CD279)": ("PDCD1",),
    "PD-L1 (CD274)": ("CD274",),
    "PD1 (CD279)": ("PDCD1",),
    "PECAM (CD31)": ("PECAM1",),
    "Siglec-8": ("SIGLEC8",),
    "TCRb": ("TRBC1", "TRBC2"),  # TCR beta constant regions
    "TCRg": ("TRGC1", "TRGC2"),  # TCR gamma constant regions
}


def _csr_float32(x) -> sp.csr_matrix:
    m = sp.csr_matrix(x, dtype=np.float32)
    m.sort_indices()
    m.eliminate_zeros()
    return m


def highly_variable_genes(counts: sp.csr_matrix, n_top: int, min_cells: int) -> np.ndarray:
    """Indices of the ``n_top`` most dispersed genes (Seurat-style, on log-normalised data)."""
    lib = np.asarray(counts.sum(axis=1)).ravel()
    x = sp.diags(TARGET_SUM / lib) @ counts
    x.data = np.log1p(x.data)
    mean = np.asarray(x.mean(axis=0)).ravel()
    mean_sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
    n = x.shape[0]
    var = (mean_sq - mean**2) * n / (n - 1)
    detected = np.asarray((counts > 0).sum(axis=0)).ravel()
    ok = (detected >= min_cells) & (mean > 0)
    disp = np.zeros_like(mean)
    disp[ok] = np.log(var[ok] / mean[ok])
    bins = pd.cut(mean[ok], bins=20)
    frame = pd.DataFrame({"disp": disp[ok], "bin": bins})
    grouped = frame.groupby("bin", observed=True)["disp"]
    bin_mean = grouped.transform("mean").to_numpy()
    bin_std = grouped.transform("std").to_numpy()
    z = np.where(np.isfinite(bin_std) & (bin_std > 0), (frame["disp"] - bin_mean) / bin_std, 1.0)
    score = np.full(mean.shape, -np.inf)
    score[ok] = z
    # stable sort on (-score, index) so ties resolve the same way every run
    order = np.lexsort((np.arange(score.size), -score))
    return np.sort(order[: min(n_top, int(ok.sum()))])


def build(data_dir: Path) -> tuple[ad.AnnData, ad.AnnData, pd.DataFrame, list[str]]:
    """Return the demo RNA and protein AnnData, the mapping table and unmapped antibodies."""
    rna_src = ad.read_h5ad(data_dir / f"{SOURCE}_rna.h5ad")
    adt_src = ad.read_h5ad(data_dir / f"{SOURCE}_adt.h5ad")
    if not rna_src.obs_names.equals(adt_src.obs_names):
        raise ValueError("source RNA and ADT cells differ")

    # protein: drop isotype controls, keep every other antibody
    keep_adt = ~adt_src.var_names.isin(ISOTYPE_CONTROLS)
    adt_x = _csr_float32(adt_src.X)[:, keep_adt].toarray()
    protein_names = adt_src.var_names[keep_adt]
    unknown = set(protein_names) - set(PROTEIN_TO_GENE)
    if unknown:
        raise ValueError(f"antibodies missing from the curated table: {sorted(unknown)}")

    # RNA: drop zero-count genes, then HVG union linked genes
    rna_x = _csr_float32(rna_src.X)
    nonzero = np.asarray(rna_x.sum(axis=0)).ravel() > 0
    rna_x = rna_x[:, nonzero]
    genes = rna_src.var_names[nonzero]
    hvg = highly_variable_genes(rna_x, N_HVG, MIN_CELLS)
    gene_index = pd.Index(genes)
    rows, unmapped = [], []
    for protein in protein_names:
        linked = [g for g in PROTEIN_TO_GENE[protein] if g in gene_index]
        dropped = [g for g in PROTEIN_TO_GENE[protein] if g not in gene_index]
        if dropped:
            print(f"  {protein}: gene(s) not in RNA data (or zero counts): {dropped}")
        if not linked:
            unmapped.append(protein)
        rows.extend((protein, g) for g in linked)
    mapping = pd.DataFrame(rows, columns=["protein", "rna"])
    linked_idx = gene_index.get_indexer(mapping["rna"].unique())
    keep = np.union1d(hvg, linked_idx)
    is_hvg = np.isin(keep, hvg)

    rna = ad.AnnData(
        X=_csr_float32(rna_x[:, keep]),
        obs=pd.DataFrame(index=pd.Index(rna_src.obs_names, name=None)),
        var=pd.DataFrame({"highly_variable": is_hvg}, index=pd.Index(genes[keep], name=None)),
    )
    protein = ad.AnnData(
        X=np.ascontiguousarray(adt_x, dtype=np.float32),
        obs=pd.DataFrame(index=pd.Index(adt_src.obs_names, name=None)),
        var=pd.DataFrame(index=pd.Index(protein_names, name=None)),
    )
    source = (
        "ECCITE-seq PBMC, Mimitou et al. 2019 (Nat Methods 16:409), GEO GSE126310; "
        "500-cell subset from the CiteFuse R package (CITEseq_example)"
    )
    rna.uns["source"] = source
    protein.uns["source"] = source
    rna.uns["demo"] = (
        f"top {N_HVG} dispersed genes union protein-linked genes; zero-count genes dropped"
    )
    protein.uns["demo"] = f"isotype controls {list(ISOTYPE_CONTROLS)} dropped"

    assert rna.var_names.is_unique and protein.var_names.is_unique
    assert set(mapping["rna"]) <= set(rna.var_names)
    assert set(mapping["protein"]) <= set(protein.var_names)
    return rna, protein, mapping, unmapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args()

    rna, protein, mapping, unmapped = build(args.data_dir)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    rna.write_h5ad(out / "demo_rna.h5ad", compression="gzip")
    protein.write_h5ad(out / "demo_protein.h5ad", compression="gzip")
    mapping.to_csv(out / "demo_protein_to_gene.csv", index=False)

    sizes = {f: (out / f).stat().st_size for f in ("demo_rna.h5ad", "demo_protein.h5ad")}
    print(f"rna {rna.shape} ({int(rna.var['highly_variable'].sum())} HVG), protein {protein.shape}")
    print(
        f"mapping rows {len(mapping)}, linked proteins {mapping['protein'].nunique()}, "
        f"linked genes {mapping['rna'].nunique()}"
    )
    print(f"unmapped antibodies: {unmapped}")
    print(f"sizes (bytes): {sizes}, total {sum(sizes.values())}")


if __name__ == "__main__":
    main()
