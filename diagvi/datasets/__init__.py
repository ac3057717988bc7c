"""Small real datasets that ship with diagvi.

The demo is a 500-cell CITE-seq experiment: RNA and surface-protein counts of the same
cells, plus a curated table linking each antibody to the gene(s) that encode its target.
"""

from __future__ import annotations

from importlib.resources import as_file, files
from pathlib import Path

import anndata as ad
import pandas as pd

__all__ = ["DEMO_DIR", "DEMO_FILES", "load_demo", "load_h5ad"]

#: Folder holding the demo files (the installed ``diagvi/datasets`` package folder).
DEMO_DIR: Path = Path(__file__).resolve().parent

#: Package-data file names of the demo, by role.
DEMO_FILES: dict[str, str] = {
    "rna": "demo_rna.h5ad",
    "protein": "demo_protein.h5ad",
    "mapping": "demo_protein_to_gene.csv",
}


def _read_h5ad(name: str) -> ad.AnnData:
    with as_file(files(__name__) / name) as path:
        return ad.read_h5ad(path)


def load_demo() -> tuple[dict[str, ad.AnnData], pd.DataFrame]:
    """Load the bundled demo: unpaired-style RNA and protein counts plus their feature links.

    The cells come from an ECCITE-seq study of human peripheral blood mononuclear cells
    (Mimitou et al., "Multiplexed detection of proteins, transcriptomes, clonotypes and
    CRISPR perturbations in single cells", Nature Methods 16, 409-412, 2019; GEO
    GSE126310), using the 500-cell subset that the CiteFuse R package distributes as its
    example. Both modalities were measured in the same cells, so row ``i`` of one
    modality is row ``i`` of the other: treat them as unpaired when fitting, and use the
    pairing only to score an alignment (for example with FOSCTTM).

    How the subset was made (``experiments/demo_data/make_demo.py`` regenerates it):
    the two isotype-control antibodies (IgG1, IgG2a) were removed and the sample
    hashtags were not kept; genes without counts were removed; the RNA keeps the 2,000
    genes with the highest mean-binned dispersion of log-normalised expression, plus
    every gene the mapping table links to (2,020 genes in all). The antibodies without
    a linked gene (CD138, CD66b, CD77, EpCAM, Siglec-8) stay in the protein data.

    Returns
    -------
    adatas : dict of str to anndata.AnnData
        ``"rna"``: 500 cells x 2,020 genes, raw counts as a CSR float32 matrix, gene
        symbols as ``var_names`` and ``var["highly_variable"]`` marking the 2,000
        selected genes. ``"protein"``: 500 cells x 47 antibodies, raw counts as a
        dense float32 array. Both have the same ``obs_names`` in the same order.
    mapping : pandas.DataFrame
        Columns ``protein`` and ``rna``, one row per antibody -> gene link (52 rows;
        42 antibodies, 47 genes). Curated from CD nomenclature: an antibody against a
        multi-chain complex links to each chain's gene (for example ``CD8`` -> ``CD8A``
        and ``CD8B``). Every entry is present in the matching ``var_names``.

    Examples
    --------
    >>> from diagvi.datasets import load_demo
    >>> adatas, mapping = load_demo()
    >>> adatas["rna"].shape, adatas["protein"].shape
    ((500, 2020), (500, 47))
    """
    adatas = {
        "rna": _read_h5ad(DEMO_FILES["rna"]),
        "protein": _read_h5ad(DEMO_FILES["protein"]),
    }
    mapping_file = files(__name__) / DEMO_FILES["mapping"]
    with mapping_file.open("r", encoding="utf-8") as handle:
        mapping = pd.read_csv(handle, dtype=str, keep_default_na=False)
    return adatas, mapping


def load_h5ad(
    paths: dict[str, str | Path], backed: bool | str = "auto", backed_limit_gb: float = 2.0
) -> tuple[dict[str, ad.AnnData], None]:
    """Read one ``.h5ad`` per modality; the error names a path that does not exist.

    Parameters
    ----------
    paths
        ``{modality name: path}``.
    backed
        ``True``: open every file with ``backed="r"``, so its matrix stays on disk and
        training reads it chunk by chunk (:mod:`diagvi.stream`; X must be CSR or dense).
        ``False``: load into memory. ``"auto"``: open backed the files larger than
        ``backed_limit_gb``.
    backed_limit_gb
        File size (GB, 10**9 bytes) above which ``backed="auto"`` keeps a file on disk.
        Reading a file into memory takes about twice its size (the AnnData and the float32
        copy training uses).

    Returns
    -------
    ``({modality: AnnData}, None)``; the guidance table comes from ``data.mapping_path``.
    """
    if backed not in (True, False, "auto"):
        raise ValueError(f"backed must be true, false or auto, got {backed!r}")
    adatas = {}
    for name, path in paths.items():
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"modality {name!r}: no such file {str(path)!r}")
        on_disk = backed is True or (
            backed == "auto" and path.stat().st_size > backed_limit_gb * 1e9
        )
        adatas[name] = ad.read_h5ad(path, backed="r" if on_disk else None)
    return adatas, None
