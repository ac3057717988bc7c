"""What a finished run writes (per-modality latent h5ad, embedding PNG, metrics) and the
objectives a sweep optimises, measured on the held-out (validation) cells."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np

from diagvi.data import UNLABELED, ModalityData, PairedDataModule
from diagvi.errors import DataError
from diagvi.inference import latent_representation
from diagvi.metrics import foscttm, label_transfer
from diagvi.module import DiagVAE
from diagvi.plotting import plot_joint_embedding

# FOSCTTM and kNN label transfer cost (cells)^2 distances: beyond this many cells they are
# computed on a seeded random subset of this size (seconds on one CPU core; hours at 10^6)
METRIC_MAX_CELLS = 20_000


def _at_most(n: int, max_cells: int | None, seed: int = 0) -> np.ndarray:
    """All of ``range(n)``, or a sorted seeded random ``max_cells`` of them when n is larger."""
    if max_cells is None or n <= max_cells:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_cells, replace=False))


def paired_foscttm(
    latents: Mapping[str, np.ndarray],
    data: Mapping[str, ModalityData],
    max_cells: int | None = METRIC_MAX_CELLS,
) -> dict[str, float]:
    """FOSCTTM over the cells whose ``obs_names`` appear in both modalities.

    With more than ``max_cells`` such cells, over a seeded random subset of ``max_cells`` of
    them (``foscttm_cells`` in the result says so); ``None``: always all.
    """
    a, b = data
    shared = data[a].obs_names.intersection(data[b].obs_names)
    if len(shared) < 2:
        return {}
    n_shared, shared = len(shared), shared[_at_most(len(shared), max_cells)]
    xa = latents[a][data[a].obs_names.get_indexer(shared)]
    xb = latents[b][data[b].obs_names.get_indexer(shared)]
    if not (np.isfinite(xa).all() and np.isfinite(xb).all()):
        # a NaN distance is never "closer": a diverged model would score 0 (perfect pairing)
        result = dict.fromkeys(("foscttm", "foscttm_x", "foscttm_y"), float("nan"))
    else:
        result = foscttm(xa, xb)
    if len(shared) < n_shared:
        result["foscttm_cells"] = len(shared)
    return result


# what each objective's optimum is; val/loss is logged by the training loop itself
OBJECTIVE_DIRECTIONS = {
    "val/foscttm": "minimize",
    "val/label_transfer": "maximize",
    "val/loss": "minimize",
}


def _cells(d: ModalityData, idx: np.ndarray) -> ModalityData:
    return dataclasses.replace(
        d, X=d.X[idx], batch=d.batch[idx], labels=d.labels[idx], obs_names=d.obs_names[idx]
    )


_NEEDS = {
    "val/foscttm": (
        "val/foscttm needs at least 2 held-out cells measured in both modalities (same "
        "obs_names); are the data paired (data.paired) and data.val_fraction > 0?"
    ),
    "val/label_transfer": (
        "val/label_transfer needs labels (labels_key) in both modalities and labelled "
        "held-out cells (data.val_fraction > 0)"
    ),
}


def check_heldout(name: str, dm: PairedDataModule) -> None:
    """Refuse, before training, an objective that ``dm``'s held-out cells cannot give.

    ``val/foscttm`` needs two held-out cells of the same name in both modalities;
    ``val/label_transfer`` labelled training cells in one modality and labelled held-out
    cells in the other; ``val/loss`` any held-out cells.
    """
    if not dm.has_validation:
        raise DataError(f"no {name} to optimise: set data.val_fraction > 0")
    if name == "val/foscttm":
        a, b = (d.obs_names[dm.val_idx[m]] for m, d in dm.data.items())
        ok = len(a.intersection(b)) >= 2
    elif name == "val/label_transfer":
        labelled = {
            m: [(d.labels[idx[m]] != UNLABELED).any() for idx in (dm.train_idx, dm.val_idx)]
            for m, d in dm.data.items()
        }
        ok = any(labelled[s][0] and labelled[t][1] for s in dm.data for t in dm.data if s != t)
    else:
        ok = True
    if not ok:
        raise DataError(_NEEDS[name])


def heldout_foscttm(
    module: DiagVAE, data: Mapping[str, ModalityData], val_idx: Mapping[str, np.ndarray]
) -> float:
    """FOSCTTM over the held-out cells present in both modalities (same ``obs_names``)."""
    held = {m: _cells(d, val_idx[m]) for m, d in data.items()}
    latents = {m: latent_representation(module, d) for m, d in held.items()}
    result = paired_foscttm(latents, held)
    if not result:
        raise DataError(_NEEDS["val/foscttm"])
    return result["foscttm"]


def heldout_label_transfer(
    module: DiagVAE,
    data: Mapping[str, ModalityData],
    train_idx: Mapping[str, np.ndarray],
    val_idx: Mapping[str, np.ndarray],
    k: int = 15,
) -> float:
    """kNN label-transfer accuracy onto held-out cells, averaged over both directions.

    For a source and a target modality that both have labels, the labelled training cells of
    the source vote (``k`` nearest neighbours in the joint latent space,
    :func:`diagvi.metrics.label_transfer`) on the labelled held-out cells of the target;
    beyond :data:`METRIC_MAX_CELLS` cells, a seeded random subset of that many of each.
    """
    scores = []
    for source, target in ((a, b) for a in data for b in data if a != b):
        ref = _cells(data[source], train_idx[source])
        query = _cells(data[target], val_idx[target])
        ref, query = (_cells(d, np.flatnonzero(d.labels != UNLABELED)) for d in (ref, query))
        ref, query = (_cells(d, _at_most(d.n_obs, METRIC_MAX_CELLS)) for d in (ref, query))
        if ref.n_obs and query.n_obs:
            z_ref, z_query = (latent_representation(module, d) for d in (ref, query))
            if not (np.isfinite(z_ref).all() and np.isfinite(z_query).all()):
                # neighbours among NaN distances are arbitrary: no accuracy, not a chance one
                scores.append(float("nan"))
                continue
            scores.append(label_transfer(z_ref, ref.labels, z_query, query.labels, k=k)["accuracy"])
    if not scores:
        raise DataError(_NEEDS["val/label_transfer"])
    return float(np.mean(scores))


def heldout_metric(name: str, module: DiagVAE, dm: PairedDataModule) -> float:
    """Objective ``name`` (``val/foscttm`` or ``val/label_transfer``) on ``dm``'s held-out cells."""
    if name == "val/foscttm":
        return heldout_foscttm(module, dm.data, dm.val_idx)
    if name == "val/label_transfer":
        return heldout_label_transfer(module, dm.data, dm.train_idx, dm.val_idx)
    raise ValueError(f"no held-out metric {name!r}; expected val/foscttm or val/label_transfer")


def write_run_outputs(
    module: DiagVAE,
    data: Mapping[str, ModalityData],
    adatas: Mapping[str, ad.AnnData],
    run_dir: Path,
    paired: bool = False,
) -> dict[str, float | str]:
    """Write ``latent_<modality>.h5ad`` (``obsm['X_diagvi']``, posterior mean), ``embedding.png``.

    Returns the metrics computed on the way (FOSCTTM when ``paired``) and the written paths.
    Cells whose latent is not finite (a diverged model) are warned about and counted in
    ``nonfinite_<modality>``.
    """
    latents = {m: latent_representation(module, d) for m, d in data.items()}
    written: dict[str, float | str] = {}
    for m, z in latents.items():
        bad = int((~np.isfinite(z).all(axis=1)).sum())
        if bad:
            written[f"nonfinite_{m}"] = bad
            warnings.warn(
                f"modality {m!r}: the latent of {bad} of {len(z)} cells is not finite (NaN or "
                "inf): the model diverged; they are written as they are and left out of "
                "embedding.png",
                UserWarning,
                stacklevel=2,
            )
    for m, z in latents.items():
        # the cells that were read (empty="drop" leaves out all-zero ones), in their order
        out = ad.AnnData(obs=adatas[m].obs.loc[data[m].obs_names].copy())
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
