"""From AnnData to paired minibatches: per-modality setup, reading, encoding, splits and loaders.

Each modality is read once into a :class:`ModalityData` (a private copy of the matrix, batch
codes, label codes), validated on the way by :mod:`diagvi.checks` (messages that name the
modality, the field, what was expected and how to fix it; ``docs/input_checks.md`` lists every
check). Training pairs the two modalities: one minibatch is ``{"rna": {...}, "protein": {...}}``.
An AnnData opened with ``backed="r"`` stays on disk (:mod:`diagvi.stream`): its rows are read
chunk by chunk, and the sampler shuffles chunks rather than single cells.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset

from diagvi.checks import (  # check_adatas: also imported from here by diagvi.model
    _check_anndata,
    _check_names,
    _check_setups,
    _check_values,
    _matrix,
    _obs_column,
    _support,
    check_adatas,
    handle_empty,
)
from diagvi.errors import DataError
from diagvi.stream import BackedMatrix, chunk_shuffle

UNLABELED = -1  # label code of an unlabelled cell
EMPTY_POLICIES = ("warn", "drop", "error")
DENSE_COPY_BYTES = 32 * 2**20  # training gathers from a dense copy of a sparse matrix this small


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
    empty
        What to do with all-zero cells and features when reading the training data:
        ``"warn"`` (default) keeps them and warns, ``"drop"`` drops the all-zero cells (all-zero
        features are kept, with the warning, because the feature set must match the guidance
        graph and any data later passed for inference), ``"error"`` raises :class:`DataError`.
        The default keeps every output aligned with the user's cells.
    encoder_pcs
        Give the encoder the top ``encoder_pcs`` principal components of the modality's
        transformed input (e.g. log1p of CP10k) instead of every feature, as GLUE's
        ``use_rep``; the components are fitted once, on a sample of the training cells, before
        training (:class:`diagvi.nn.PrincipalComponents`). ``None`` (default): every feature.
        The decoder, the likelihood and the graph still see every feature.
    """

    layer: str | None = None
    batch_key: str | None = None
    labels_key: str | None = None
    unlabeled_category: str = "unknown"
    likelihood: str = "nb"
    empty: str = "warn"
    encoder_pcs: int | None = None

    def __post_init__(self) -> None:
        for key in ("layer", "batch_key", "labels_key"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise TypeError(
                    f"ModalitySetup.{key} must be a str or None, got {value!r}; give the name "
                    f"of the {'layer' if key == 'layer' else 'obs column'}"
                )
        if not isinstance(self.likelihood, str):
            raise TypeError(f"ModalitySetup.likelihood must be a str, got {self.likelihood!r}")
        if self.empty not in EMPTY_POLICIES:
            raise DataError(
                f"ModalitySetup.empty must be one of {list(EMPTY_POLICIES)}, got {self.empty!r}; "
                "'warn' keeps all-zero cells and features, 'drop' drops the cells, 'error' refuses"
            )
        pcs = self.encoder_pcs
        if pcs is not None:
            if isinstance(pcs, bool) or not isinstance(pcs, int | np.integer) or pcs < 1:
                raise DataError(
                    f"ModalitySetup.encoder_pcs must be a positive integer or None, got {pcs!r}; "
                    "e.g. 30 (the encoder reads 30 principal components)"
                )
            object.__setattr__(self, "encoder_pcs", int(pcs))  # an h5ad gives back numpy ints


@dataclass
class ModalityData:
    """One modality ready for training: matrix, codes and names (never the user's objects).

    ``X`` is a private copy in memory, or a :class:`~diagvi.stream.BackedMatrix` reading the
    user's ``.h5ad`` file.
    """

    name: str
    X: np.ndarray | sp.csr_matrix | BackedMatrix
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
        if isinstance(self.X, BackedMatrix):
            x = self.X.read(idx)
        else:
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
    encoder_pcs: int | None = None


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
            m: ModalitySpec(
                d.n_vars, len(d.batch_categories), d.setup.likelihood, d.setup.encoder_pcs
            )
            for m, d in data.items()
        }
        return cls(modalities, tuple(label_categories), graph)


# ---------------------------------------------------------------------------------------------
# one modality


def _batches(name: str, adata: ad.AnnData, key: str | None) -> tuple[np.ndarray, list[str]]:
    """Batch codes ``0 .. B-1`` and the names of the batches that have cells."""
    if key is None:
        return np.zeros(adata.n_obs, dtype=np.int64), ["0"]
    values = _obs_column(name, adata, key, "batch_key").astype("category")
    missing = values.isna().to_numpy()
    if missing.any():
        raise DataError(
            f"modality {name!r}: batch_key {key!r} has missing values in {int(missing.sum())} "
            f"cell(s), e.g. {adata.obs_names[np.argmax(missing)]!r}; expected a batch for every "
            "cell: fill them in (e.g. with 'unknown') or drop those cells"
        )
    values = values.cat.remove_unused_categories()  # a batch with no cell would train nothing
    return values.cat.codes.to_numpy().astype(np.int64), [str(c) for c in values.cat.categories]


def read_modality(name: str, adata: ad.AnnData, setup: ModalitySetup) -> ModalityData:
    """Validate one AnnData and copy what training needs out of it.

    The cheap checks (type, shape, names, obs columns, likelihood) come before the matrix is
    copied and its values checked. The user's AnnData is never modified.

    Raises
    ------
    TypeError
        ``adata`` is not an AnnData, ``setup`` not a :class:`ModalitySetup`, or the matrix is
        not real-valued.
    DataError
        Any failed check (``docs/input_checks.md``).
    """
    _check_anndata(name, adata)
    if not isinstance(setup, ModalitySetup):
        raise TypeError(
            f"modality {name!r}: expected a ModalitySetup, got {type(setup).__name__}; "
            "build one with ModalitySetup(layer=..., batch_key=..., ...)"
        )
    _check_names(name, adata)
    if setup.labels_key is not None:
        _obs_column(name, adata, setup.labels_key, "labels_key")
    _support(name, setup.likelihood)
    if setup.encoder_pcs is not None and setup.encoder_pcs > adata.n_vars:
        raise DataError(
            f"modality {name!r}: encoder_pcs={setup.encoder_pcs} exceeds its {adata.n_vars} "
            f"features; give at most {adata.n_vars}, or None to encode every feature"
        )
    batch, categories = _batches(name, adata, setup.batch_key)
    X, where = _matrix(name, adata, setup.layer)
    _check_values(name, where, X, setup.likelihood, adata)
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


# ---------------------------------------------------------------------------------------------
# both modalities and their labels


def _label_name(value: object) -> str:
    """The class name of a label: its string, a whole float written as an integer.

    pandas stores an integer column with a missing value as float, so cluster ``1`` is ``1.0``
    in one modality and ``1`` in the other: the same class, named ``"1"`` in both.
    """
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _label_values(name: str, adata: ad.AnnData, setup: ModalitySetup) -> pd.Series:
    """Labels as strings (classes match by name, :func:`_label_name`), ``None`` for unlabelled
    cells.

    A cell is unlabelled when its label is missing (NaN/None) or ``setup.unlabeled_category``
    (as written, or as a number: ``"-1"`` matches ``-1.0``).
    """
    raw = _obs_column(name, adata, setup.labels_key, "labels_key")
    codes, uniques = pd.factorize(raw.astype(object))  # missing -> -1; names built once each
    unlabeled = {str(setup.unlabeled_category), _label_name(setup.unlabeled_category)}
    names = [None if {str(u), _label_name(u)} & unlabeled else _label_name(u) for u in uniques]
    return pd.Series(np.array([*names, None], dtype=object)[codes], dtype=object)


def read_modalities(
    adatas: Mapping[str, ad.AnnData],
    setups: Mapping[str, ModalitySetup],
    categories: Sequence[str] | None = None,
    batch_categories: Mapping[str, Sequence[str]] | None = None,
) -> tuple[dict[str, ModalityData], tuple[str, ...]]:
    """Read both modalities and encode their labels against one shared list of classes.

    Applies each modality's ``empty`` policy (:func:`diagvi.checks.handle_empty`).

    Parameters
    ----------
    adatas, setups
        The AnnData objects and their setups, by modality.
    categories, batch_categories
        A saved model's label classes and batch names per modality: labels and batches are
        then encoded by name against them (a class or batch they lack is an error), and a
        modality may lack its labels column or hold no labelled cell (its cells are unlabelled).

    Returns
    -------
    tuple
        The per-modality data and the label categories (sorted union of the labelled classes
        of every modality, or ``categories``; the unlabelled category is never a class).
    """
    adatas = check_adatas(adatas)
    _check_setups(adatas, setups)
    saved = categories is not None
    if saved:  # a saved model on new cells, which may carry no labels
        setups = {m: _labels_if_present(adatas[m], s) for m, s in setups.items()}
    data, labels = {}, {}
    for name, adata in adatas.items():
        data[name], kept = handle_empty(read_modality(name, adata, setups[name]))
        if batch_categories is not None:
            _recode_batches(data[name], list(batch_categories[name]))
        if setups[name].labels_key is not None:
            labels[name] = _label_values(name, adata, setups[name]).iloc[kept]
    if not saved:
        categories = tuple(sorted({v for values in labels.values() for v in values.dropna()}))
    elif alias := _saved_float_names(categories):
        labels = {name: values.replace(alias) for name, values in labels.items()}
    for name, values in labels.items():
        setup = setups[name]
        if values.isna().all() and not saved:
            raise DataError(
                f"modality {name!r}: every cell is unlabelled in labels_key "
                f"{setup.labels_key!r} (NaN or unlabeled_category={setup.unlabeled_category!r}); "
                "expected some labelled cells: drop labels_key or add labels"
            )
        if saved and (unknown := sorted(set(values.dropna().unique()) - set(categories))):
            raise DataError(
                f"modality {name!r}: labels_key {setup.labels_key!r} holds labels {unknown} that "
                f"were not classes of the saved model: {list(categories)}; mark those cells "
                f"unlabelled (NaN or {setup.unlabeled_category!r})"
            )
        codes = pd.Categorical(values, categories=list(categories)).codes  # None -> -1
        data[name].labels = codes.astype(np.int64)
    return data, tuple(categories)


def _saved_float_names(categories: Sequence[str]) -> dict[str, str]:
    """``{name: saved name}`` for the classes of a model saved when a whole float label was
    named as Python writes it (``"1.0"``, now ``"1"``, :func:`_label_name`)."""
    alias = {}
    for c in categories:
        try:
            value = float(c)
        except ValueError:
            continue
        if str(value) == c and value.is_integer() and _label_name(value) not in categories:
            alias[_label_name(value)] = c
    return alias


def _labels_if_present(adata: ad.AnnData, setup: ModalitySetup) -> ModalitySetup:
    """``setup`` without its labels key when ``adata`` has no such column."""
    if setup.labels_key is None or setup.labels_key in adata.obs:
        return setup
    return dataclasses.replace(setup, labels_key=None)


def _recode_batches(d: ModalityData, saved: list[str]) -> None:
    """Re-encode ``d``'s batch codes by name against a saved model's batches ``saved``."""
    unknown = [b for b in d.batch_categories if b not in saved]
    if unknown:
        raise DataError(
            f"modality {d.name!r}: batches {unknown} were not batches of the saved model: "
            f"{saved}; its per-batch parameters exist for those only"
        )
    d.batch = np.array([saved.index(b) for b in d.batch_categories], dtype=np.int64)[d.batch]
    d.batch_categories = saved


def shared_order(names: Mapping[str, pd.Index], seed: int) -> dict[str, np.ndarray]:
    """A seeded random order of each modality's cells in which a name has one rank everywhere.

    The cells of all modalities are ranked together by name, so the first cells of each
    modality's order are, as far as their names overlap, the same cells: paired data's
    held-out cells are then measured in both modalities whatever the files' row order. For
    modalities without shared names each order is a plain random permutation.
    """
    union = pd.Index(np.concatenate([np.asarray(n, dtype=object) for n in names.values()]))
    union = union.unique()
    rank = np.random.default_rng(seed).permutation(len(union))
    return {
        k: np.argsort(rank[union.get_indexer(np.asarray(n, dtype=object))], kind="stable")
        for k, n in names.items()
    }


def split_indices(
    n: int,
    val_fraction: float,
    seed: int,
    groups: Sequence[np.ndarray] = (),
    order: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random train/validation split of ``n`` cells.

    ``round(n * val_fraction)`` cells (at most ``n - 1``: training needs a cell) go to
    validation: the first ones of ``order`` (a permutation of the cells, e.g. from
    :func:`shared_order`; ``None``: a permutation drawn from ``seed``). Every category of each
    code array in ``groups`` (batches, labels; negative codes such as :data:`UNLABELED` are
    ignored) keeps at least one training cell: a category whose cells all fell in validation
    moves one of them, at random, to training, since its batch parameters or label class
    would otherwise never be trained.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise DataError(f"val_fraction must lie in [0, 1], got {val_fraction}; e.g. 0.1")
    perm = np.random.default_rng(seed).permutation(n) if order is None else np.asarray(order)
    is_val = np.zeros(n, dtype=bool)
    is_val[perm[: max(0, min(int(round(n * val_fraction)), n - 1))]] = True
    for codes in groups:
        shuffled = np.asarray(codes)[perm]
        categories, first = np.unique(shuffled, return_index=True)  # first cell of each, at random
        missing = (categories >= 0) & ~np.isin(categories, np.asarray(codes)[~is_val])
        is_val[perm[first[missing]]] = False
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


class PairedSampler:
    """Yields paired index minibatches ``{modality: indices}`` of unequal-size modalities.

    An epoch walks the largest modality once. A smaller modality streams through successive
    permutations: each time it is exhausted it is reshuffled, so no batch order ever repeats.
    Without shuffling (validation) the order is the natural one, cycled. ``set_epoch`` (called
    by Lightning) reseeds the epoch, which keeps runs reproducible and resumable.

    Distributed training (``num_replicas > 1``): every rank draws the same global sequence of
    minibatches and keeps every ``num_replicas``-th one, starting at its ``rank``, so ranks see
    disjoint cells. A rank left one short repeats the epoch's first minibatches, so that every
    rank runs the same number of steps (as torch's ``DistributedSampler`` pads).

    A modality read from disk is shuffled by chunks (``chunks[modality] = (chunk_rows,
    buffer_chunks)``, :func:`diagvi.stream.chunk_shuffle`): each of its permutations visits the
    file chunk by chunk and mixes cells within buffers of chunks.
    """

    def __init__(
        self,
        indices: Mapping[str, np.ndarray],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        chunks: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must lie in [0, num_replicas={num_replicas}), got {rank}")
        self.chunks = dict(chunks or {})
        self.indices = {k: np.asarray(v) for k, v in indices.items()}
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, 0
        self.num_replicas, self.rank = num_replicas, rank
        self.lead = max(self.indices, key=lambda k: len(self.indices[k]))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def n_global_batches(self) -> int:
        """Minibatches in one epoch over all ranks."""
        return math.ceil(len(self.indices[self.lead]) / self.batch_size)

    def __len__(self) -> int:
        return math.ceil(self.n_global_batches / self.num_replicas)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self.num_replicas == 1:
            yield from self._global()
            return
        n, mine, first = self.n_global_batches, [], []
        for i, batch in enumerate(self._global()):
            if i < self.num_replicas * len(self) - n:  # the padding, at most one per rank
                first.append(batch)
            if i % self.num_replicas == self.rank:
                yield batch
                mine.append(i)
        if len(mine) < len(self):
            # fewer minibatches than ranks to pad (n < num_replicas / 2): they repeat in turn
            yield first[(self.rank - n % self.num_replicas) % len(first)]

    def _stream(self, name: str, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """Successive orders of modality ``name``'s cells."""
        idx = self.indices[name]
        while True:
            if not self.shuffle:
                yield idx
            elif name in self.chunks:
                yield chunk_shuffle(idx, *self.chunks[name], rng)
            else:
                yield rng.permutation(idx)

    def _global(self) -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        lead = next(self._stream(self.lead, rng))
        others = {k: self._stream(k, rng) for k in self.indices if k != self.lead}
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
    num_replicas: int = 1,
    rank: int = 0,
) -> DataLoader:
    """A DataLoader over :class:`PairedSampler` minibatches (no collation needed); this rank's
    share of them in distributed training. Modalities on disk are shuffled by chunks."""
    chunks = {
        k: (d.X.chunk_rows, d.X.buffer_chunks)
        for k, d in data.items()
        if isinstance(d.X, BackedMatrix)
    }
    sampler = PairedSampler(indices, batch_size, shuffle, seed, num_replicas, rank, chunks)
    return DataLoader(
        PairedDataset(data),
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def with_dense_rows(data: Mapping[str, ModalityData]) -> dict[str, ModalityData]:
    """The modalities, each small sparse matrix (at most :data:`DENSE_COPY_BYTES` dense)
    replaced by a dense copy; larger ones, dense ones and files are shared as they are.

    A minibatch of a dense matrix is a plain row gather, where scipy's fancy indexing and
    ``toarray`` cost several times more (256 cells of the benchmark's MERFISH, 134 genes:
    56 -> 7 us per modality and step; 2,020 genes: 147 -> 61 us).
    """
    return {
        k: dataclasses.replace(d, X=d.X.toarray())
        if sp.issparse(d.X) and d.n_obs * d.n_vars * 4 <= DENSE_COPY_BYTES
        else d
        for k, d in data.items()
    }


class PairedDataModule(L.LightningDataModule):
    """Train/validation split per modality (seeded) and paired loaders for both.

    Parameters
    ----------
    data
        Per-modality data from :func:`read_modalities`.
    batch_size
        Cells per modality per minibatch.
    val_fraction
        Fraction of each modality's cells held out for validation; a cell measured in both
        modalities (the same ``obs_name``) is held out in both.
    seed
        Seed of the split and of the minibatch order.
    num_workers
        DataLoader worker processes.

    Its loaders read small sparse matrices from dense copies (:func:`with_dense_rows`).
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
            with_dense_rows(data),
            batch_size,
            seed,
            num_workers,
        )
        # a cell measured in both modalities (same name) is held out in both; every batch and
        # label class keeps a training cell (see split_indices)
        order = shared_order({k: d.obs_names for k, d in data.items()}, seed)
        splits = {
            k: split_indices(d.n_obs, val_fraction, seed, (d.batch, d.labels), order[k])
            for k, d in data.items()
        }
        # a cell that split_indices moved to training (its batch or class had no other) in one
        # modality trains in every modality: validating its other measurement would score a
        # cell the model was trained on
        moved = set()
        for k, d in data.items():
            planned = split_indices(d.n_obs, val_fraction, seed, (), order[k])[1]
            moved.update(d.obs_names[np.setdiff1d(planned, splits[k][1])])
        for k, d in data.items():
            train, val = splits[k]
            out = np.isin(d.obs_names[val], list(moved))
            splits[k] = np.sort(np.concatenate([train, val[out]])), val[~out]
        self.train_idx = {k: s[0] for k, s in splits.items()}
        self.val_idx = {k: s[1] for k, s in splits.items()}

    @property
    def has_validation(self) -> bool:
        """Whether every modality holds out some cells (else no validation runs)."""
        return all(len(v) for v in self.val_idx.values())

    def _replicas(self) -> tuple[int, int]:
        """``(world_size, global_rank)`` of the attached trainer; ``(1, 0)`` without one."""
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        return paired_loader(
            self.data,
            self.train_idx,
            self.batch_size,
            True,
            self.seed,
            self.num_workers,
            *self._replicas(),
        )

    def transfer_batch_to_device(
        self, batch: dict[str, dict[str, torch.Tensor]], device: torch.device, dataloader_idx: int
    ) -> dict[str, dict[str, torch.Tensor]]:
        # our minibatches are {modality: {name: tensor}}: Lightning's generic collection walk
        # costs more than the copy itself (here rather than on the LightningModule, which would
        # make Lightning warn at every fit that a data module was given)
        return {
            m: {k: t.to(device, non_blocking=True) for k, t in b.items()} for m, b in batch.items()
        }

    def val_dataloader(self) -> DataLoader | list:
        if not self.has_validation:
            return []
        return paired_loader(
            self.data,
            self.val_idx,
            self.batch_size,
            False,
            self.seed,
            self.num_workers,
            *self._replicas(),
        )
