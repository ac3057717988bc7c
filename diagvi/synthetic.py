"""Synthetic pairs of modalities with known pairing, labels and feature links.

:func:`make_synthetic_pair` builds a small pair in memory, for tests. :func:`write_synthetic_pair`
(``python -m diagvi.synthetic --n-cells 1000000 --out DIR``) writes a pair of any size to disk,
chunk by chunk with bounded memory, for training from disk and scale benchmarks.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

#: File names :func:`write_synthetic_pair` writes, by role.
SYNTHETIC_FILES = {"rna": "rna.h5ad", "protein": "protein.h5ad", "mapping": "mapping.csv"}


def _check_sizes(minimum: dict[str, int], **sizes: object) -> None:
    """Refuse non-integer sizes, sizes below ``minimum[name]`` and more proteins than genes.

    Without this, a bad size fails deep in numpy or h5py with a message naming no argument,
    or (a negative ``chunk_size``) writes an all-zero pair without complaint.
    """
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        if value < minimum[name]:
            raise ValueError(f"{name} must be at least {minimum[name]}, got {value}")
    if sizes["n_proteins"] > sizes["n_genes"]:
        raise ValueError(
            f"n_proteins ({sizes['n_proteins']}) must not exceed n_genes ({sizes['n_genes']}): "
            "protein k is linked to gene k"
        )


def _softmax(logits: np.ndarray) -> np.ndarray:
    rate = np.exp(logits - logits.max(1, keepdims=True))
    return rate / rate.sum(1, keepdims=True)


def _gamma_poisson(
    rng: np.random.Generator,
    logits: np.ndarray,
    depth: float,
    theta: float | np.ndarray = 5.0,
    sigma: float = 0.3,
) -> np.ndarray:
    """Negative-binomial counts as a gamma-Poisson mixture, one row per cell.

    ``x ~ Poisson(Gamma(theta, mu / theta))`` (mean ``mu``, dispersion ``theta``) with
    ``mu = softmax(logits) * library`` and ``library = depth * LogNormal(0, sigma)``.
    """
    rate = _softmax(logits)
    library = depth * rng.lognormal(sigma=sigma, size=(len(logits), 1))
    return rng.poisson(rng.gamma(theta, rate * library / theta)).astype(np.float32)


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
    _check_sizes(
        {"n_cells": 0, "n_genes": 1, "n_proteins": 1, "n_types": 1, "n_dims": 1, "seed": 0},
        n_cells=n_cells,
        n_genes=n_genes,
        n_proteins=n_proteins,
        n_types=n_types,
        n_dims=n_dims,
        seed=seed,
    )
    rng = np.random.default_rng(seed)
    types = rng.integers(n_types, size=n_cells)
    centres = rng.normal(scale=2.0, size=(n_types, n_dims))
    state = centres[types] + rng.normal(scale=0.5, size=(n_cells, n_dims))
    gene_loadings = rng.normal(size=(n_genes, n_dims))
    protein_loadings = gene_loadings[:n_proteins] + rng.normal(scale=0.2, size=(n_proteins, n_dims))
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([f"type_{t}" for t in types])},
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    genes = [f"gene_{g}" for g in range(n_genes)]
    proteins = [f"protein_{p}" for p in range(n_proteins)]
    rna = ad.AnnData(
        sp.csr_matrix(_gamma_poisson(rng, state @ gene_loadings.T, 2000.0)),
        obs=obs.copy(),
        var=pd.DataFrame(index=genes),
    )
    protein = ad.AnnData(
        _gamma_poisson(rng, state @ protein_loadings.T, 1000.0),
        obs=obs.copy(),
        var=pd.DataFrame(index=proteins),
    )
    mapping = pd.DataFrame({"protein": proteins, "rna": genes[:n_proteins]})
    return {"rna": rna, "protein": protein}, mapping


# ---------------------------------------------------------------------------------------------
# a pair of any size, written to disk


class _Design:
    """The fixed part of a large synthetic pair: cell types, state, feature parameters.

    Closer to real data than :func:`make_synthetic_pair`: unequal cell-type proportions, gene
    abundances spread over orders of magnitude (so most genes are zero in most cells, about
    15 % of RNA entries are non-zero), gene-specific dispersion, and proteins with an ambient
    background (rarely zero). Protein ``k`` is linked to gene ``k`` and shares its loadings,
    up to noise.
    """

    def __init__(self, n_genes: int, n_proteins: int, n_types: int, seed: int) -> None:
        rng = np.random.default_rng([seed, 0])
        n_dims = 10
        self.type_weights = rng.dirichlet(np.full(n_types, 3.0))
        self.centres = rng.normal(scale=1.2, size=(n_types, n_dims))
        self.gene_base = rng.normal(scale=1.5, size=n_genes)
        self.gene_loadings = rng.normal(scale=0.5, size=(n_genes, n_dims))
        self.gene_theta = rng.lognormal(np.log(3.0), 0.5, size=n_genes)
        self.protein_base = rng.normal(scale=0.7, size=n_proteins)
        self.protein_loadings = self.gene_loadings[:n_proteins] + rng.normal(
            scale=0.1, size=(n_proteins, n_dims)
        )

    def sample(
        self, types: np.ndarray, rng: np.random.Generator
    ) -> tuple[sp.csr_matrix, np.ndarray]:
        """RNA (CSR) and protein (dense) counts of cells of types ``types``."""
        state = self.centres[types] + rng.normal(scale=0.6, size=(len(types), len(self.centres[0])))
        rna_logits = self.gene_base + state @ self.gene_loadings.T
        rna = _gamma_poisson(rng, rna_logits, 1500.0, self.gene_theta, sigma=0.5)
        signal = _softmax(self.protein_base + state @ self.protein_loadings.T)
        ambient = 1.0 / signal.shape[1]  # antibodies bind a little everywhere: a background
        protein = _gamma_poisson(rng, np.log(0.8 * signal + 0.2 * ambient), 3000.0, 10.0)
        return sp.csr_matrix(rna), protein


def _skeleton(path: Path, obs: pd.DataFrame, var_names: list[str]) -> None:
    """An ``.h5ad`` without X (obs, var and the empty groups anndata expects)."""
    ad.AnnData(obs=obs, var=pd.DataFrame(index=var_names)).write_h5ad(path)


def _csr_group(f: h5py.File, shape: tuple[int, int]) -> h5py.Group:
    """An empty, growable CSR X as anndata encodes it."""
    group = f.create_group("X")
    group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0"})
    group.attrs["shape"] = np.array(shape, dtype=np.int64)
    for key, dtype in (("data", np.float32), ("indices", np.int32)):
        group.create_dataset(key, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1 << 18,))
    group.create_dataset("indptr", shape=(shape[0] + 1,), dtype=np.int64)
    return group


def _append_csr(group: h5py.Group, start: int, block: sp.csr_matrix) -> None:
    """Write the CSR rows ``block`` at row ``start`` (rows must arrive in order)."""
    offset = int(group["indptr"][start])
    for key, values in (("data", block.data), ("indices", block.indices)):
        group[key].resize((offset + block.nnz,))
        group[key][offset:] = values
    # int64: the block's int32 offsets would wrap past 2**31 values (about 7 M cells of 2,000 genes)
    ends = offset + block.indptr[1:].astype(np.int64)
    group["indptr"][start + 1 : start + 1 + block.shape[0]] = ends


def write_synthetic_pair(
    out: str | Path,
    n_cells: int,
    n_genes: int = 2000,
    n_proteins: int = 100,
    n_types: int = 8,
    seed: int = 0,
    chunk_size: int = 10_000,
) -> dict[str, Path]:
    """Write a synthetic RNA + protein pair of ``n_cells`` cells to the folder ``out``.

    ``rna.h5ad`` holds RNA counts as CSR float32, ``protein.h5ad`` protein counts as a dense
    float32 array, both with ``obs["cell_type"]`` labels and the same ``obs_names`` in the same
    order (the known pairing); ``mapping.csv`` links protein ``k`` to gene ``k`` (columns
    ``protein, rna``). Cells are generated and written ``chunk_size`` at a time, so the
    matrices take about ``chunk_size * n_genes * 40`` bytes whatever ``n_cells``; the cell
    names and labels are held whole (about 100 MB per million cells). Each file
    is written under a temporary name and renamed when complete. The same arguments give the
    same files.

    Returns
    -------
    ``{"rna": path, "protein": path, "mapping": path}``
    """
    _check_sizes(
        {"n_cells": 1, "n_genes": 1, "n_proteins": 1, "n_types": 1, "seed": 0, "chunk_size": 1},
        n_cells=n_cells,
        n_genes=n_genes,
        n_proteins=n_proteins,
        n_types=n_types,
        seed=seed,
        chunk_size=chunk_size,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    design = _Design(n_genes, n_proteins, n_types, seed)
    types = np.random.default_rng([seed, 1]).choice(n_types, size=n_cells, p=design.type_weights)
    categories = [f"type_{t}" for t in range(n_types)]
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical.from_codes(types, categories=categories)},
        index=pd.Index([f"cell_{i}" for i in range(n_cells)]),
    )
    genes = [f"gene_{g}" for g in range(n_genes)]
    proteins = [f"protein_{p}" for p in range(n_proteins)]
    paths = {role: out / name for role, name in SYNTHETIC_FILES.items()}
    tmp = {role: out / f".{path.stem}.tmp{path.suffix}" for role, path in paths.items()}
    try:
        _skeleton(tmp["rna"], obs, genes)
        _skeleton(tmp["protein"], obs, proteins)
        with h5py.File(tmp["rna"], "a") as rna_file, h5py.File(tmp["protein"], "a") as protein_file:
            rna = _csr_group(rna_file, (n_cells, n_genes))
            protein = protein_file.create_dataset(
                "X",
                shape=(n_cells, n_proteins),
                dtype=np.float32,
                chunks=(max(1, min(n_cells, 4096)), n_proteins),
            )
            protein.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
            for c, start in enumerate(range(0, n_cells, chunk_size)):
                stop = min(start + chunk_size, n_cells)
                rna_block, protein_block = design.sample(
                    types[start:stop], np.random.default_rng([seed, 2, c])
                )
                _append_csr(rna, start, rna_block)
                protein[start:stop] = protein_block
        pd.DataFrame({"protein": proteins, "rna": genes[:n_proteins]}).to_csv(
            tmp["mapping"], index=False
        )
    except BaseException:  # an interrupted or failed write leaves no hidden half-files
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise
    for role, path in paths.items():
        os.replace(tmp[role], path)
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """``python -m diagvi.synthetic --n-cells N --out DIR``: write a pair to disk."""
    parser = argparse.ArgumentParser(
        prog="python -m diagvi.synthetic", description=write_synthetic_pair.__doc__.split("\n")[0]
    )
    parser.add_argument("--n-cells", type=int, required=True, help="cells per modality")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--n-proteins", type=int, default=100)
    parser.add_argument("--n-types", type=int, default=8, help="cell types (obs['cell_type'])")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=10_000, help="cells generated at once")
    args = parser.parse_args(argv)
    if args.n_proteins > args.n_genes:
        parser.error("--n-proteins must not exceed --n-genes (protein k links to gene k)")
    for name in ("n_cells", "n_genes", "n_proteins", "n_types", "seed", "chunk_size"):
        least = 0 if name == "seed" else 1
        if getattr(args, name) < least:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} must be at least {least}, got {getattr(args, name)}")
    paths = write_synthetic_pair(
        args.out,
        args.n_cells,
        n_genes=args.n_genes,
        n_proteins=args.n_proteins,
        n_types=args.n_types,
        seed=args.seed,
        chunk_size=args.chunk_size,
    )
    for role, path in paths.items():
        print(f"{role}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return paths


if __name__ == "__main__":
    main()
