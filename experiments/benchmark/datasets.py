"""Benchmark datasets: two AnnData (raw counts in ``layers["counts"]``), a feature mapping and
what is known about the cells (evaluation labels, training labels, pairing).

Each loader returns a :class:`BenchData`. Files come from ``../shared/data`` (see its README)
except the ECCITE demo, which ships with diagvi. Large sets are subsampled (``max_cells``) so
a quick run stays fast; the subsample is fixed by ``SEED``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from diagvi.datasets import load_demo
from experiments.demo_data.make_demo import PROTEIN_TO_GENE, highly_variable_genes

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = REPO.parent / "shared" / "data"
SEED = 0
N_HVG = 2000
OTHER = "other"  # gated cells that match no type: left out of label metrics

# PBMC 5k/10k TotalSeq-B panels: names as in the files without "_TotalSeqB". Antibodies named
# as in the ECCITE table reuse its curated genes; the rest are from CD nomenclature (HCDM).
PBMC_EXTRA_PROTEIN_TO_GENE: dict[str, tuple[str, ...]] = {
    "CD8a": ("CD8A",),
    "CD15": ("FUT4",),  # Lewis X glycan; made by fucosyltransferase 4
    "CD20": ("MS4A1",),
    "CD25": ("IL2RA",),
    "CD80": ("CD80",),
    "CD86": ("CD86",),
    "CD127": ("IL7R",),
    "CD137": ("TNFRSF9",),
    "CD197": ("CCR7",),
    "CD274": ("CD274",),
    "CD278": ("ICOS",),
    "CD335": ("NCR1",),
    "HLA-DR": ("HLA-DRA", "HLA-DRB1", "HLA-DRB5"),
    "PD-1": ("PDCD1",),
    "TIGIT": ("TIGIT",),
}

# Protein gates for the CITE-seq sets, which ship without labels: a cell gets the type whose
# markers are all high (z-scored CLR above GATE_MIN; "-" marks a marker that must be low).
# Every non-T gate excludes CD3+ cells, as flow cytometry gates do: without it, T cells with
# CD14 or CD19 antibody background were labelled monocytes or B cells (README, "Datasets").
GATES: dict[str, tuple[tuple[str, ...], ...]] = {
    "CD4 T": (("CD3",), ("CD4",)),
    "CD8 T": (("CD3",), ("CD8", "CD8a")),
    "B": (("CD19", "CD20"), ("-CD3",)),
    "NK": (("CD56",), ("-CD3",)),
    "Monocyte": (("CD14",), ("-CD3",)),
}
GATE_MIN = 0.5


@dataclasses.dataclass
class BenchData:
    """One benchmark dataset.

    Attributes
    ----------
    name
        Dataset name (CLI and result tables).
    adatas
        ``{modality: AnnData}`` with raw counts in ``X`` and ``layers["counts"]``; training
        labels (if any) in ``obs["cell_type"]``.
    mapping
        Feature links, one column per modality.
    labels
        ``{modality: label per cell or None}`` for evaluation only (may include labels the
        model does not see).
    train_labels
        Modalities whose ``obs["cell_type"]`` the models are given.
    pairs
        ``(n, 2)`` row indices ``(row in modality 0, row in modality 1)`` of cells measured in
        both, or None for unpaired data.
    missing_type
        Cell type present in modality 0 only (composition robustness), or None.
    impute
        ``(source, target, target features to score)`` or None.
    likelihoods
        ``{modality: likelihood}`` given to both implementations; ``nb`` where absent.
    small
        Part of ``--quick``.
    """

    name: str
    adatas: dict[str, ad.AnnData]
    mapping: pd.DataFrame
    labels: dict[str, np.ndarray | None]
    train_labels: tuple[str, ...] = ()
    pairs: np.ndarray | None = None
    missing_type: str | None = None
    impute: tuple[str, str, list[str]] | None = None
    likelihoods: dict[str, str] = dataclasses.field(default_factory=dict)
    small: bool = True

    @property
    def modalities(self) -> list[str]:
        return list(self.adatas)

    def likelihood(self, modality: str) -> str:
        """The likelihood both implementations use for ``modality``."""
        return self.likelihoods.get(modality, "nb")


# ------------------------------------------------------------------ helpers


def _counts(x) -> sp.csr_matrix:
    return sp.csr_matrix(x, dtype=np.float32)


def _anndata(x, obs_names, var_names, cell_type=None) -> ad.AnnData:
    x = _counts(x)
    obs = pd.DataFrame(index=pd.Index([str(o) for o in obs_names]))
    if cell_type is not None:
        obs["cell_type"] = pd.Categorical(np.asarray(cell_type, dtype=str))
    adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index([str(v) for v in var_names])))
    adata.layers["counts"] = x.copy()
    return adata


def _read(name: str) -> ad.AnnData:
    path = DATA_DIR / f"{name}.h5ad"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the benchmark needs ../shared/data")
    adata = ad.read_h5ad(path)
    if "counts" in adata.layers:
        adata.X = adata.layers["counts"]
    return adata


def _subsample(n: int, max_cells: int | None, seed: int = SEED) -> np.ndarray:
    if max_cells is None or n <= max_cells:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False))


def _hvg_union(counts: sp.csr_matrix, genes: pd.Index, keep: list[str]) -> np.ndarray:
    """Indices (sorted) of the top ``N_HVG`` dispersed genes with counts plus ``keep``."""
    nonzero = np.flatnonzero(np.asarray(counts.sum(0)).ravel() > 0)
    hvg = nonzero[highly_variable_genes(counts[:, nonzero], N_HVG, 3)]
    linked = genes.get_indexer([g for g in keep if g in genes])
    return np.union1d(hvg, linked[linked >= 0])


def gate_labels(counts: np.ndarray, proteins: list[str]) -> np.ndarray:
    """Coarse PBMC types from antibody counts (for data without labels).

    ``z`` = per-antibody z-score of the CLR transform ``log1p(x_ij) - mean_j log1p(x_ij)``;
    a type's score is the minimum over its gates of the best marker of the gate (``-m``:
    ``-z_m``); each cell takes the best-scoring type, or ``"other"`` below ``GATE_MIN``.
    """
    log = np.log1p(np.asarray(counts, dtype=np.float64))
    clr = log - log.mean(1, keepdims=True)
    sd = clr.std(0)
    z = (clr - clr.mean(0)) / np.where(sd > 0, sd, 1.0)
    col = {p: z[:, i] for i, p in enumerate(proteins)}
    types, scores = [], []
    for cell_type, gates in GATES.items():
        per_gate = []
        for gate in gates:
            found = [
                (-col[m[1:]] if m.startswith("-") else col[m]) for m in gate if m.lstrip("-") in col
            ]
            if not found:
                break
            per_gate.append(np.max(found, axis=0))
        else:
            types.append(cell_type)
            scores.append(np.min(per_gate, axis=0))
    scores = np.stack(scores, axis=1)
    best = np.asarray(types, dtype=object)[scores.argmax(1)]
    return np.where(scores.max(1) >= GATE_MIN, best, OTHER).astype(str)


def _cite(
    name: str, rna: ad.AnnData, protein: ad.AnnData, mapping: pd.DataFrame, small: bool
) -> BenchData:
    prot_x = protein.X.toarray() if sp.issparse(protein.X) else np.asarray(protein.X)
    labels = gate_labels(prot_x, list(protein.var_names))
    n = rna.n_obs
    return BenchData(
        name=name,
        adatas={
            "rna": _anndata(rna.X, rna.obs_names, rna.var_names),
            "protein": _anndata(prot_x, protein.obs_names, protein.var_names),
        },
        mapping=mapping[["rna", "protein"]].reset_index(drop=True),
        labels={"rna": labels, "protein": labels},
        pairs=np.stack([np.arange(n), np.arange(n)], axis=1),
        impute=("rna", "protein", list(protein.var_names)),
        # antibody counts as log-normal: better pairing and transfer than NB on two of the
        # three pairs (README, "Datasets")
        likelihoods={"rna": "nb", "protein": "log1pnormal"},
        small=small,
    )


# ------------------------------------------------------------------ loaders


def load_eccite(max_cells: int | None = None) -> BenchData:
    """ECCITE-seq PBMC demo (500 paired cells, RNA + 47 antibodies), shipped with diagvi."""
    adatas, mapping = load_demo()
    keep = _subsample(adatas["rna"].n_obs, max_cells)
    return _cite("eccite", adatas["rna"][keep], adatas["protein"][keep], mapping, small=True)


def load_pbmc(which: str = "10k", max_cells: int | None = None) -> BenchData:
    """10x PBMC ``5k`` or ``10k`` CITE-seq subset (200 paired cells), treated as unpaired.

    RNA keeps the top 2,000 dispersed genes plus every linked gene; antibody names lose their
    ``_TotalSeqB`` suffix and link to genes by the ECCITE table plus
    :data:`PBMC_EXTRA_PROTEIN_TO_GENE`.
    """
    rna = _read(f"pbmc_{which}_protein_v3_scvitest_rna")
    adt = _read(f"pbmc_{which}_protein_v3_scvitest_adt")
    if not rna.obs_names.equals(adt.obs_names):
        raise ValueError(f"pbmc {which}: RNA and ADT cells differ")
    keep = _subsample(rna.n_obs, max_cells)
    rna, adt = rna[keep], adt[keep]
    proteins = [p.removesuffix("_TotalSeqB") for p in adt.var_names]
    table = {**PROTEIN_TO_GENE, **PBMC_EXTRA_PROTEIN_TO_GENE}
    genes = pd.Index(rna.var_names)
    rows = [(g, p) for p in proteins for g in table.get(p, ()) if g in genes]
    mapping = pd.DataFrame(rows, columns=["rna", "protein"])
    counts = _counts(rna.X)
    cols = _hvg_union(counts, genes, list(mapping["rna"]))
    rna_sel = ad.AnnData(X=counts[:, cols], obs=pd.DataFrame(index=rna.obs_names))
    rna_sel.var_names = genes[cols]
    protein = ad.AnnData(X=_counts(adt.X), obs=pd.DataFrame(index=adt.obs_names))
    protein.var_names = proteins
    return _cite(f"pbmc{which}", rna_sel, protein, mapping, small=which == "10k")


def _reference_to_spatial(
    name: str, ref: ad.AnnData, spatial: ad.AnnData, names: tuple[str, str], small: bool
) -> BenchData:
    """scRNA reference (labelled) and spatial data on shared gene names (identity mapping)."""
    genes = ref.var_names.intersection(spatial.var_names)
    ref_counts = _counts(ref[:, genes].X)
    if len(genes) > N_HVG:
        genes = genes[_hvg_union(ref_counts, genes, [])]
        ref_counts = _counts(ref[:, genes].X)
    sp_counts = _counts(spatial[:, genes].X)
    ok_ref = np.asarray(ref_counts.sum(1)).ravel() > 0
    ok_sp = np.asarray(sp_counts.sum(1)).ravel() > 0
    labels = ref.obs["cell_type"].astype(str).to_numpy()[ok_ref]
    a, b = names
    return BenchData(
        name=name,
        adatas={
            a: _anndata(ref_counts[ok_ref], ref.obs_names[ok_ref], genes, labels),
            b: _anndata(sp_counts[ok_sp], spatial.obs_names[ok_sp], genes),
        },
        mapping=pd.DataFrame({a: list(genes), b: list(genes)}),
        labels={a: labels, b: None},
        train_labels=(a,),
        small=small,
    )


def load_pdac(max_cells: int | None = None) -> BenchData:
    """PDAC inDrop scRNA (15 types) -> spatial transcriptomics spots (Moncada et al. 2020).

    Genes: the top 2,000 dispersed scRNA genes among those measured in both.
    """
    ref = _read("pdac_moncada2020_scrna")
    st = _read("pdac_moncada2020_st")
    ref = ref[_subsample(ref.n_obs, max_cells)]
    return _reference_to_spatial("pdac", ref, st, ("scrna", "st"), small=False)


def load_merfish(max_cells: int | None = None) -> BenchData:
    """Mouse hypothalamus scRNA reference (14 types) -> MERFISH, same 134-gene panel."""
    ref = _read("merfish_spacexr_reference_scrna")
    spatial = _read("merfish_spacexr_spatial")
    ref = ref[_subsample(ref.n_obs, max_cells)]
    spatial = spatial[_subsample(spatial.n_obs, max_cells)]
    return _reference_to_spatial("merfish", ref, spatial, ("scrna", "merfish"), small=False)


def load_gene_split(
    missing_type: str = "Microglia", n_shared: int = 34, max_cells: int | None = None
) -> BenchData:
    """A gene split of the labelled MERFISH reference scRNA, one cell type removed from one side.

    Cells with labels ``Ambiguous``/``Unstable`` are dropped. The 134 genes are shuffled
    (``SEED``); modality ``a`` gets the first ``(134 + n_shared) / 2``, ``b`` the last as many,
    so ``n_shared`` genes are linked (by name) and the rest are private. Both sides hold the
    same cells, except that ``b`` lacks ``missing_type``; the model sees ``a``'s labels only.
    Imputation is scored on ``b``'s private genes, predicted from ``a``.
    """
    src = _read("merfish_spacexr_reference_scrna")
    src = src[~src.obs["cell_type"].isin(["Ambiguous", "Unstable"]).to_numpy()]
    src = src[_subsample(src.n_obs, max_cells)]
    counts = _counts(src.X)
    labels = src.obs["cell_type"].astype(str).to_numpy()
    if missing_type not in set(labels):
        raise ValueError(f"missing_type {missing_type!r} is not a cell type: {sorted(set(labels))}")
    genes = np.asarray(src.var_names)
    order = np.random.default_rng(SEED).permutation(len(genes))
    half = (len(genes) + n_shared) // 2
    a_idx, b_idx = np.sort(order[:half]), np.sort(order[-half:])
    rows_a = np.flatnonzero(np.asarray(counts[:, a_idx].sum(1)).ravel() > 0)
    in_b = np.asarray(counts[:, b_idx].sum(1)).ravel() > 0
    rows_b = np.flatnonzero(in_b & (labels != missing_type))
    rows_b = rows_b[np.isin(rows_b, rows_a)]
    pos_a = {r: i for i, r in enumerate(rows_a)}
    pairs = np.array([(pos_a[r], j) for j, r in enumerate(rows_b)])
    shared = sorted(set(genes[a_idx]) & set(genes[b_idx]))
    private_b = [g for g in genes[b_idx] if g not in set(shared)]
    return BenchData(
        name="genesplit",
        adatas={
            "a": _anndata(
                counts[rows_a][:, a_idx], src.obs_names[rows_a], genes[a_idx], labels[rows_a]
            ),
            "b": _anndata(counts[rows_b][:, b_idx], src.obs_names[rows_b], genes[b_idx]),
        },
        mapping=pd.DataFrame({"a": shared, "b": shared}),
        labels={"a": labels[rows_a], "b": labels[rows_b]},
        train_labels=("a",),
        pairs=pairs,
        missing_type=missing_type,
        impute=("a", "b", private_b),
        small=True,
    )


LOADERS: dict[str, Callable[..., BenchData]] = {
    "eccite": load_eccite,
    "pbmc10k": lambda max_cells=None: load_pbmc("10k", max_cells),
    "pbmc5k": lambda max_cells=None: load_pbmc("5k", max_cells),
    "genesplit": lambda max_cells=None: load_gene_split(max_cells=max_cells),
    "merfish": load_merfish,
    "pdac": load_pdac,
}


def load(name: str, max_cells: int | None = None) -> BenchData:
    """Load a dataset by name (one of :data:`LOADERS`)."""
    if name not in LOADERS:
        raise KeyError(f"unknown dataset {name!r}; known: {list(LOADERS)}")
    return LOADERS[name](max_cells=max_cells)
