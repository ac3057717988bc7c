"""Is this input valid? The checks run on the user's modalities before training.

Every check raises :class:`~diagvi.errors.DataError` (or ``TypeError`` for a wrong type) with a
message that names the modality, the field, what was expected and how to fix it, and leaves the
user's objects unchanged (``docs/input_checks.md`` lists every check). :mod:`diagvi.data` calls
these while it reads the modalities; this module never imports :mod:`diagvi.data`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple, TypeVar

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from diagvi.errors import DataError
from diagvi.registry import LIKELIHOODS
from diagvi.stream import BackedMatrix, blocks

# modality names become ModuleDict keys (no "."), file and log names (no "/"), and mapping-table
# columns next to the optional "weight" and "sign" columns
RESERVED_MODALITY_NAMES = ("weight", "sign")

_D = TypeVar("_D")  # a diagvi.data.ModalityData (not imported: diagvi.data imports this module)


# ---------------------------------------------------------------------------------------------
# containers and names


def check_modality_names(names: Sequence) -> None:
    """Check that modality names are usable as module keys, file names and table columns.

    Raises
    ------
    TypeError
        A name is not a ``str``.
    DataError
        A name is empty, holds ``.`` or ``/``, is ``weight`` or ``sign`` (the optional columns
        of a mapping table), or two names differ only in case (their saved files would clash).
    """
    for name in names:
        if not isinstance(name, str):
            raise TypeError(
                f"modality names must be str, got {name!r} ({type(name).__name__}); "
                "name modalities e.g. 'rna' and 'protein'"
            )
        if not name or "." in name or "/" in name or name in RESERVED_MODALITY_NAMES:
            raise DataError(
                f"modality name {name!r} is not allowed: expected a non-empty name without '.' "
                f"or '/' other than {list(RESERVED_MODALITY_NAMES)} (names key modules, files and "
                "mapping-table columns); rename the modality, e.g. 'rna' or 'protein'"
            )
    folded = pd.Index([n.casefold() for n in names])
    if folded.has_duplicates:
        raise DataError(
            f"modality names {list(names)} clash: they differ only in case, so their saved "
            "files would collide; rename one of them"
        )


def check_adatas(adatas) -> dict[str, ad.AnnData]:
    """The two modalities as a ``{name: AnnData}`` dict, checked before anything is read.

    Parameters
    ----------
    adatas
        Mapping ``{modality name: AnnData}`` or a ``MuData`` with two modalities.

    Raises
    ------
    TypeError
        ``adatas`` is not a mapping (or MuData), or a value is not an AnnData.
    DataError
        Not exactly two modalities, or names that :func:`check_modality_names` refuses.
    """
    if type(adatas).__name__ == "MuData" and isinstance(getattr(adatas, "mod", None), Mapping):
        adatas = adatas.mod  # duck-typed: mudata is optional
    if not isinstance(adatas, Mapping):
        raise TypeError(
            "expected a dict {modality name: AnnData} or a MuData, "
            f"got {type(adatas).__name__}; e.g. {{'rna': adata_rna, 'protein': adata_protein}}"
        )
    if len(adatas) != 2:
        raise DataError(
            f"DiagVI integrates exactly two modalities, got {len(adatas)}: {list(adatas)}; "
            "pass one AnnData per modality, two in all"
        )
    check_modality_names(list(adatas))
    for name, adata in adatas.items():
        _check_anndata(name, adata)
    return dict(adatas)


def _check_anndata(name: str, adata) -> None:
    if not isinstance(adata, ad.AnnData):
        raise TypeError(
            f"modality {name!r}: expected an AnnData, got {type(adata).__name__}; wrap a cells x "
            "features table as anndata.AnnData(df)"
        )


# ---------------------------------------------------------------------------------------------
# values


class Support(NamedTuple):
    """Values a likelihood accepts: ``lower`` bound (``strict``: excluded), ``integer`` only."""

    lower: float
    strict: bool
    integer: bool

    def describe(self) -> str:
        if math.isinf(self.lower):
            return "finite values"
        kind = "integer counts" if self.integer else "values"
        if self.lower == 0 and not self.strict:
            return f"non-negative {kind} (>= 0)"
        return f"{kind} {'>' if self.strict else '>='} {self.lower:g}"


@functools.lru_cache
def likelihood_support(likelihood: str) -> Support:
    """The support of the distribution that likelihood ``likelihood`` returns.

    Read from the distribution itself (one 1 x 1 forward pass), so a new likelihood needs no
    entry here: ``nb``/``zinb``/``nbmixture`` take integers >= 0, ``ziln``/``zig`` values >= 0,
    ``log1pnormal`` values > -1 and ``normal`` any finite value. Every support contains 0, so the
    implicit zeros of a sparse matrix never need checking.
    """
    lik = LIKELIHOODS.build(likelihood, 1, 1)
    with torch.no_grad():
        support = lik(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), torch.ones(1, 1)).support
    lower = float(getattr(support, "lower_bound", -math.inf))
    strict = math.isfinite(lower) and not bool(support.check(torch.tensor(lower)))
    return Support(lower, strict, bool(support.is_discrete))


def _support(name: str, likelihood: str) -> Support:
    try:
        return likelihood_support(likelihood)
    except DataError as err:  # unknown name: say which modality asked for it
        raise DataError(f"modality {name!r}: {err}; set likelihood= to one of them") from None


def _entry(X, bad: np.ndarray, offset: int, obs_names: pd.Index, var_names: pd.Index) -> str:
    """``value at cell, feature`` of the first True of ``bad`` (a mask over the block X, or its
    ``.data``), X holding the rows from ``offset`` on."""
    k = int(np.argmax(bad))
    if sp.issparse(X):
        row, col = int(np.searchsorted(X.indptr, k, side="right")) - 1, X.indices[k]
        value = X.data[k]
    else:
        row, col = divmod(k, X.shape[1])
        value = X[row, col]
    return f"{value:g} at cell {obs_names[offset + row]!r}, feature {var_names[col]!r}"


def _matrix(
    name: str, adata: ad.AnnData, layer: str | None
) -> tuple[np.ndarray | sp.csr_matrix | BackedMatrix, str]:
    """A private float32 copy (dense C-order, or canonical CSR) of X or a layer.

    An AnnData opened with ``backed="r"`` (not a view of one) keeps its X on disk: the result
    is then a :class:`~diagvi.stream.BackedMatrix` that reads float32 rows on demand. Its
    layers are copied from memory like any AnnData's.
    """
    if layer is None:
        X, where = adata.X, "X"
    elif layer in adata.layers:
        X, where = adata.layers[layer], f"layer {layer!r}"
    else:
        raise DataError(
            f"modality {name!r}: layer {layer!r} not found; available layers: "
            f"{list(adata.layers.keys()) or 'none'}; pass one of them, or layer=None to read X"
        )
    if X is None:
        raise DataError(f"modality {name!r}: X is empty (None); pass layer= to read a layer")
    # anndata keeps only X on disk: a backed AnnData's layers are read into memory, where the
    # user may have replaced or added one since the file was opened
    if layer is None and adata.isbacked and not adata.is_view:
        try:
            X = BackedMatrix.open(adata, layer)
        except DataError as err:
            raise DataError(f"modality {name!r}: {err}") from None
    dtype = np.dtype(getattr(X, "dtype", object))
    if dtype.kind not in "biuf":
        raise TypeError(
            f"modality {name!r}: {where} must hold real numbers, got dtype {dtype}; "
            "convert it to float32 or an integer type"
        )
    if isinstance(X, BackedMatrix):
        return X, where
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported below
        if sp.issparse(X):
            # one private float32 copy: csr_matrix(X, dtype, copy=True) converts and then
            # copies again, holding twice the result's memory at its peak
            csr = X.tocsr()  # a new matrix unless X is CSR already
            X = sp.csr_matrix(csr.astype(np.float32, copy=csr is X), copy=False)
            X.sum_duplicates()  # our copy: canonical, so each stored value is one entry
            X.eliminate_zeros()
        else:
            X = np.array(X, dtype=np.float32, order="C")
    return X, where


def _check_values(name: str, where: str, X, likelihood: str, adata: ad.AnnData) -> None:
    """Finite values inside the likelihood's support; sparse matrices check ``.data`` only.

    One pass over the blocks of X (a single block in memory, chunks from disk), counting the
    bad values of each kind; the first kind found, in the order finite, range, integer, is
    reported, so a matrix on disk fails with the message it fails with in memory.
    """
    support = _support(name, likelihood)
    tests = {"finite": lambda v: ~np.isfinite(v)}
    if math.isfinite(support.lower):
        tests["range"] = (
            (lambda v: v <= support.lower) if support.strict else (lambda v: v < support.lower)
        )
    if support.integer:
        tests["integer"] = lambda v: np.mod(v, 1) != 0
    counts, examples = dict.fromkeys(tests, 0), {}
    for offset, block in blocks(X):
        values = block.data if sp.issparse(block) else block
        for kind, test in tests.items():
            with np.errstate(invalid="ignore"):  # NaN, reported by the finite test
                bad = test(values)
            n_bad = int(np.count_nonzero(bad))
            if n_bad:
                counts[kind] += n_bad
                if kind not in examples:
                    examples[kind] = _entry(block, bad, offset, adata.obs_names, adata.var_names)

    def fail(kind: str, expected: str, found: str, fix: str) -> DataError:
        return DataError(
            f"modality {name!r}: {expected}, but {where} has {counts[kind]} {found} value(s) "
            f"(e.g. {examples[kind]}); {fix}"
        )

    if counts["finite"]:
        # float64 beyond +-3.4e38 overflows to inf in the float32 copy
        raise fail("finite", "expected finite values", "NaN or Inf", "remove or impute them")
    needs = f"likelihood {likelihood!r} needs {support.describe()}"
    fix = "pass the raw-count layer (layer=...) or a likelihood that fits the data, e.g. "
    if counts.get("range"):
        op = "<=" if support.strict else "<"
        found = "negative" if support.lower == 0 else f"{op} {support.lower:g}"
        raise fail("range", needs, found, fix + "'normal' for scaled data")
    if counts.get("integer"):
        raise fail("integer", needs, "non-integer", fix + "'log1pnormal' for normalised data")


# ---------------------------------------------------------------------------------------------
# one modality


def _obs_column(name: str, adata: ad.AnnData, key: str, what: str) -> pd.Series:
    if key not in adata.obs:
        raise DataError(
            f"modality {name!r}: {what} {key!r} is not a column of obs; "
            f"columns: {list(adata.obs.columns)}; pass one of them, or {what}=None"
        )
    return adata.obs[key]


def _check_names(name: str, adata: ad.AnnData) -> None:
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise DataError(
            f"modality {name!r} is empty ({adata.n_obs} cells x {adata.n_vars} features); "
            "expected at least one cell and one feature: check the filtering that produced it"
        )
    for what, names in (("obs_names", adata.obs_names), ("var_names", adata.var_names)):
        if names.has_duplicates:
            dup = names[names.duplicated()].unique()[:5].tolist()
            raise DataError(
                f"modality {name!r}: duplicated {what}, e.g. {dup}; expected unique names: "
                f"call adata.{what.replace('names', 'names_make_unique')}()"
            )


def _empty(X) -> tuple[np.ndarray, np.ndarray]:
    """Masks of all-zero cells and of all-zero features (X holds no explicit zeros if sparse),
    block by block."""
    cells, features = [], np.zeros(X.shape[1], dtype=bool)
    for _, block in blocks(X):
        if sp.issparse(block):
            cells.append(np.diff(block.indptr) == 0)
            features[block.indices] = True
        else:
            cells.append(~block.any(axis=1))
            features |= block.any(axis=0)
    return np.concatenate(cells), ~features


def _keep_cells(d: _D, cells: np.ndarray) -> _D:
    """The cells ``cells`` of ``d``, with batches that lost every cell removed."""
    used, batch = np.unique(d.batch[cells], return_inverse=True)
    return dataclasses.replace(
        d,
        X=d.X[cells],
        batch=batch.reshape(-1).astype(np.int64),
        labels=d.labels[cells],
        obs_names=d.obs_names[cells],
        batch_categories=[d.batch_categories[i] for i in used],
    )


def handle_empty(d: _D) -> tuple[_D, np.ndarray]:
    """Apply ``d.setup.empty`` to the all-zero cells and features of a ``ModalityData`` ``d``.

    The policies are those of :class:`diagvi.data.ModalitySetup` (``empty=``).

    Returns
    -------
    tuple
        The data (all-zero cells dropped under ``"drop"``) and the positions of the kept cells.

    Raises
    ------
    DataError
        Every value is zero, or there are all-zero cells or features and ``empty="error"``.
    """
    cells, features = _empty(d.X)
    keep = np.arange(d.n_obs)
    where = "X" if d.setup.layer is None else f"layer {d.setup.layer!r}"
    if cells.all():
        raise DataError(
            f"modality {d.name!r}: every value of {where} is 0; expected some non-zero values: "
            "check the layer and the filtering that produced the data"
        )
    if not (cells.any() or features.any()):
        return d, keep
    found = " and ".join(
        f"{int(mask.sum())} all-zero {what}(s) (e.g. {names[mask][:3].tolist()})"
        for what, mask, names in (("cell", cells, d.obs_names), ("feature", features, d.var_names))
        if mask.any()
    )
    if d.setup.empty == "error":
        raise DataError(
            f"modality {d.name!r}: {where} has {found}; expected none (empty='error'): filter them "
            "out (e.g. scanpy.pp.filter_cells / filter_genes with min_counts=1) or set "
            "empty='drop' or 'warn'"
        )
    if d.setup.empty == "drop" and cells.any():
        keep = np.flatnonzero(~cells)
        d = _keep_cells(d, keep)
        action = (
            "dropped the cells (outputs have fewer rows than the AnnData); features are kept, "
            "as they must match the guidance graph"
        )
    elif d.setup.empty == "drop":  # all-zero features only: nothing is dropped
        action = "kept them: empty='drop' drops only cells, as features must match the graph"
    else:
        drop = " or empty='drop' to drop the cells" if cells.any() else ""
        action = f"kept them; set empty='error' to refuse them{drop}"
    warnings.warn(f"modality {d.name!r}: {where} has {found}; {action}", UserWarning, stacklevel=3)
    return d, keep


# ---------------------------------------------------------------------------------------------
# setups


def _check_setups(adatas: Mapping, setups) -> None:
    if not isinstance(setups, Mapping):
        raise TypeError(
            f"setups must be a dict {{modality name: ModalitySetup}}, got {type(setups).__name__}"
        )
    missing = [n for n in adatas if n not in setups]
    if missing:
        raise DataError(
            f"no setup for modality {missing}; expected one ModalitySetup per modality "
            "(call setup_anndata for every modality)"
        )
