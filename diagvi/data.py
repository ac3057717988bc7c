"""From AnnData to paired minibatches: per-modality setup, validation, splits and loaders.

Each modality is read once into a :class:`ModalityData` (a private copy of the matrix, batch
codes, label codes), validated with messages that name the modality and the field. Training
pairs the two modalities: one minibatch is ``{"rna": {...}, "protein": {...}}``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset

from diagvi.errors import DataError
from diagvi.registry import LIKELIHOODS

UNLABELED = -1  # label code of an unlabelled cell


@dataclass(frozen=True)
class ModalitySetup:
    """How to read one modality from its AnnData.

    Parameters
    ----------
    layer
        Layer holding the data; ``None`` reads ``X``.
    batch_key
        ``obs`` column of batch (sample, slide, donor) labels; ``None``: a single batch.
    labels_key
        ``obs`` column of cell labels for semi-supervision and label transfer.
    unlabeled_category
        Label value of cells without a label (NaN counts as unlabelled too).
    likelihood
        Registered likelihood name (``nb``, ``zinb``, ``nbmixture``, ``normal``, ...).
    """

    layer: str | None = None
    batch_key: str | None = None
    labels_key: str | None = None
    unlabeled_category: str = "unknown"
    likelihood: str = "nb"


@dataclass
class ModalityData:
    """One modality ready for training: matrix, codes and names (never the user's objects)."""

    name: str
    X: np.ndarray | sp.csr_matrix
    batch: np.ndarray
    labels: np.ndarray
    obs_names: pd.Index
    var_names: pd.Index
    batch_categories: list[str]
    setup: ModalitySetup

    @property
    def n_obs(self) -> int:
        return self.X.shape[0]

    @property
    def n_vars(self) -> int:
        return self.X.shape[1]

    def label_names(self, categories: tuple[str, ...]) -> np.ndarray:
        """Label name of every cell; ``None`` for unlabelled cells."""
        return np.array([*categories, None], dtype=object)[self.labels]  # -1 -> None

    def rows(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """The minibatch of cells ``idx`` as dense tensors."""
        x = self.X[idx]
        x = x.toarray() if sp.issparse(x) else np.asarray(x)
        return {
            "x": torch.from_numpy(x),
            "batch": torch.from_numpy(self.batch[idx]),
            "label": torch.from_numpy(self.labels[idx]),
        }


@dataclass(frozen=True)
class ModalitySpec:
    """Sizes a component needs about one modality."""

    n_features: int
    n_batches: int
    likelihood: str


@dataclass(frozen=True)
class DataSpec:
    """Everything data-dependent the model is built from."""

    modalities: dict[str, ModalitySpec]
    label_categories: tuple[str, ...] = ()
    graph: object = field(default=None, repr=False)

    @property
    def n_labels(self) -> int:
        return len(self.label_categories)

    @classmethod
    def from_data(
        cls, data: Mapping[str, ModalityData], label_categories: tuple[str, ...], graph: object
    ) -> DataSpec:
        """The spec of data read by :func:`read_modalities` and its guidance graph."""
        modalities = {
            m: ModalitySpec(d.n_vars, len(d.batch_categories), d.setup.likelihood)
            for m, d in data.items()
        }
        return cls(modalities, tuple(label_categories), graph)


def _matrix(name: str, adata: ad.AnnData, setup: ModalitySetup) -> np.ndarray | sp.csr_matrix:
    if setup.layer is None:
        X = adata.X
    elif setup.layer in adata.layers:
        X = adata.layers[setup.layer]
    else:
        raise DataError(
            f"modality {name!r}: layer {setup.layer!r} not found; available layers: "
            f"{list(adata.layers.keys()) or 'none'} (use layer=None to read X)"
        )
    if X is None:
        raise DataError(f"modality {name!r}: X is empty; pass layer= to read a layer")
    X = (
        sp.csr_matrix(X, dtype=np.float32, copy=True)
        if sp.issparse(X)
        else np.array(X, dtype=np.float32)
    )
    values = X.data if sp.issparse(X) else X
    if not np.isfinite(values).all():
        raise DataError(f"modality {name!r}: data contain NaN or Inf values; remove or impute them")
    lik = LIKELIHOODS.get(setup.likelihood)
    if lik.nonnegative and (values < 0).any():
        raise DataError(
            f"modality {name!r}: likelihood {setup.likelihood!r} needs non-negative data, found "
            f"negative values; use likelihood='normal' for centred/scaled data"
        )
    if lik.counts and not np.equal(np.mod(values, 1), 0).all():
        raise DataError(
            f"modality {name!r}: likelihood {setup.likelihood!r} needs raw integer counts, found "
            f"non-integer values; pass the raw-count layer or a continuous likelihood"
        )
    return X


def _codes(name: str, adata: ad.AnnData, key: str, what: str) -> pd.Series:
    if key not in adata.obs:
        raise DataError(
            f"modality {name!r}: {what} {key!r} is not a column of obs; "
            f"columns: {list(adata.obs.columns)}"
        )
    return adata.obs[key]


def read_modality(name: str, adata: ad.AnnData, setup: ModalitySetup) -> ModalityData:
    """Validate one AnnData and copy what training needs out of it."""
    if not isinstance(adata, ad.AnnData):
        raise TypeError(f"modality {name!r}: expected an AnnData, got {type(adata).__name__}")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise DataError(
            f"modality {name!r} is empty ({adata.n_obs} cells x {adata.n_vars} features)"
        )
    for what, names in (("obs_names", adata.obs_names), ("var_names", adata.var_names)):
        if names.has_duplicates:
            dup = names[names.duplicated()].unique()[:5].tolist()
            raise DataError(f"modality {name!r}: duplicated {what}, e.g. {dup}; make them unique")
    X = _matrix(name, adata, setup)
    if setup.batch_key is None:
        batch, categories = np.zeros(adata.n_obs, dtype=np.int64), ["0"]
    else:
        values = _codes(name, adata, setup.batch_key, "batch_key").astype("category")
        if values.isna().any():
            raise DataError(f"modality {name!r}: batch_key {setup.batch_key!r} has missing values")
        batch = values.cat.codes.to_numpy().astype(np.int64)
        categories = [str(c) for c in values.cat.categories]
    return ModalityData(
        name=name,
        X=X,
        batch=batch,
        labels=np.full(adata.n_obs, UNLABELED, dtype=np.int64),
        obs_names=adata.obs_names.copy(),
        var_names=adata.var_names.copy(),
        batch_categories=categories,
        setup=setup,
    )


def _label_series(name: str, adata: ad.AnnData, setup: ModalitySetup) -> pd.Series:
    raw = _codes(name, adata, setup.labels_key, "labels_key")
    labels = raw.astype(object).where(raw.notna(), None)
    return labels.where(labels.astype(str) != str(setup.unlabeled_category), None)


def read_modalities(
    adatas: Mapping[str, ad.AnnData], setups: Mapping[str, ModalitySetup]
) -> tuple[dict[str, ModalityData], tuple[str, ...]]:
    """Read both modalities and encode their labels against one shared list of classes.

    Returns the per-modality data and the label categories (sorted union of the labelled
    classes of every modality; the unlabelled category is never a class).
    """
    if not isinstance(adatas, Mapping):
        raise TypeError(f"expected a dict {{modality name: AnnData}}, got {type(adatas).__name__}")
    if len(adatas) != 2:
        raise DataError(
            f"DiagVI integrates exactly two modalities, got {len(adatas)}: {list(adatas)}"
        )
    missing = [n for n in adatas if n not in setups]
    if missing:
        raise DataError(f"no setup for modality {missing}; call setup for every modality")
    data = {name: read_modality(name, adata, setups[name]) for name, adata in adatas.items()}
    labels = {
        name: _label_series(name, adata, setups[name])
        for name, adata in adatas.items()
        if setups[name].labels_key is not None
    }
    categories = tuple(sorted({str(v) for s in labels.values() for v in s.dropna()}))
    for name, series in labels.items():
        if series.isna().all():
            raise DataError(
                f"modality {name!r}: every cell is unlabelled in {setups[name].labels_key!r} "
                f"(unlabeled_category={setups[name].unlabeled_category!r}); "
                "drop labels_key or add labels"
            )
        lookup = {c: i for i, c in enumerate(categories)}
        data[name].labels = np.array(
            [UNLABELED if v is None else lookup[str(v)] for v in series], dtype=np.int64
        )
    return data, categories


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random train/validation split of ``n`` cells."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    n_val = min(n_val, n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class PairedSampler:
    """Yields paired index minibatches ``{modality: indices}`` of unequal-size modalities.

    An epoch walks the largest modality once. A smaller modality streams through successive
    permutations: each time it is exhausted it is reshuffled, so no batch order ever repeats.
    Without shuffling (validation) the order is the natural one, cycled. ``set_epoch`` (called
    by Lightning) reseeds the epoch, which keeps runs reproducible and resumable.
    """

    def __init__(
        self,
        indices: Mapping[str, np.ndarray],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        self.indices = {k: np.asarray(v) for k, v in indices.items()}
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, 0
        self.lead = max(self.indices, key=lambda k: len(self.indices[k]))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.indices[self.lead]) / self.batch_size)

    def _stream(self, idx: np.ndarray, rng: np.random.Generator) -> Iterator[np.ndarray]:
        while True:
            yield rng.permutation(idx) if self.shuffle else idx

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        lead = next(self._stream(self.indices[self.lead], rng))
        others = {k: self._stream(v, rng) for k, v in self.indices.items() if k != self.lead}
        buffers = {k: np.empty(0, dtype=np.int64) for k in others}
        for start in range(0, len(lead), self.batch_size):
            batch = {self.lead: lead[start : start + self.batch_size]}
            for k, stream in others.items():
                size = min(len(batch[self.lead]), len(self.indices[k]))
                while len(buffers[k]) < size:
                    buffers[k] = np.concatenate([buffers[k], next(stream)])
                batch[k], buffers[k] = buffers[k][:size], buffers[k][size:]
            yield {k: batch[k] for k in self.indices}


class PairedDataset(Dataset):
    """Turns an index minibatch ``{modality: indices}`` into tensors."""

    def __init__(self, data: Mapping[str, ModalityData]) -> None:
        self.data = data

    def __getitem__(self, idx: Mapping[str, np.ndarray]) -> dict[str, dict[str, torch.Tensor]]:
        return {name: self.data[name].rows(np.asarray(i)) for name, i in idx.items()}


def paired_loader(
    data: Mapping[str, ModalityData],
    indices: Mapping[str, np.ndarray],
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader over :class:`PairedSampler` minibatches (no collation needed)."""
    sampler = PairedSampler(indices, batch_size, shuffle=shuffle, seed=seed)
    return DataLoader(
        PairedDataset(data),
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


class PairedDataModule(L.LightningDataModule):
    """Train/validation split per modality (seeded) and paired loaders for both.

    Parameters
    ----------
    data
        Per-modality data from :func:`read_modalities`.
    batch_size
        Cells per modality per minibatch.
    val_fraction
        Fraction of each modality's cells held out for validation.
    seed
        Seed of the split and of the minibatch order.
    num_workers
        DataLoader worker processes.
    """

    def __init__(
        self,
        data: Mapping[str, ModalityData],
        batch_size: int = 256,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.data, self.batch_size, self.seed, self.num_workers = (
            data,
            batch_size,
            seed,
            num_workers,
        )
        splits = {k: split_indices(d.n_obs, val_fraction, seed) for k, d in data.items()}
        self.train_idx = {k: s[0] for k, s in splits.items()}
        self.val_idx = {k: s[1] for k, s in splits.items()}

    def train_dataloader(self) -> DataLoader:
        return paired_loader(
            self.data, self.train_idx, self.batch_size, True, self.seed, self.num_workers
        )

    def val_dataloader(self) -> DataLoader | list:
        if any(len(v) == 0 for v in self.val_idx.values()):
            return []
        return paired_loader(
            self.data, self.val_idx, self.batch_size, False, self.seed, self.num_workers
        )
