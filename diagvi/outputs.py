"""What a finished run writes: per-modality latent h5ad, embedding PNG, metrics."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np

from diagvi.data import UNLABELED, ModalityData
from diagvi.inference import latent_representation
from diagvi.metrics import foscttm
from diagvi.module import DiagVAE
from diagvi.plotting import plot_joint_embedding


def paired_foscttm(
    latents: Mapping[str, np.ndarray], data: Mapping[str, ModalityData]
) -> dict[str, float]:
    """FOSCTTM over the cells whose ``obs_names`` appear in both modalities."""
    a, b = data
    shared = data[a].obs_names.intersection(data[b].obs_names)
    if len(shared) < 2:
        return {}
    xa = latents[a][data[a].obs_names.get_indexer(shared)]
    xb = latents[b][data[b].obs_names.get_indexer(shared)]
    return foscttm(xa, xb)


def write_run_outputs(
    module: DiagVAE,
    data: Mapping[str, ModalityData],
    adatas: Mapping[str, ad.AnnData],
    run_dir: Path,
    paired: bool = False,
) -> dict[str, float | str]:
    """Write ``latent_<modality>.h5ad`` (``obsm['X_diagvi']``, posterior mean), ``embedding.png``.

    Returns the metrics computed on the way (FOSCTTM when ``paired``) and the written paths.
    """
    latents = {m: latent_representation(module, d) for m, d in data.items()}
    written: dict[str, float | str] = {}
    for m, z in latents.items():
        out = ad.AnnData(obs=adatas[m].obs.copy())
        out.obsm["X_diagvi"] = z
        path = run_dir / f"latent_{m}.h5ad"
        out.write_h5ad(path)
        written[f"latent_{m}"] = str(path)
    categories = module.spec.label_categories
    labels = {
        m: d.label_names(categories) for m, d in data.items() if (d.labels != UNLABELED).any()
    }
    written["embedding_png"] = str(plot_joint_embedding(latents, run_dir / "embedding.png", labels))
    if paired:
        written.update(paired_foscttm(latents, data))
    return written
