"""Guidance graphs linking the features of two modalities.

A guidance graph has one node per feature: the features of the first modality
(indices ``0 .. G1-1``) followed by those of the second (``G1 .. G1+G2-1``), in the
order of ``features``, an ordered mapping ``{modality: feature_names}`` with exactly
two entries.  It is a :class:`torch_geometric.data.Data` holding

* ``edge_index`` -- ``(2, E)`` int64,
* ``edge_weight`` -- ``(E,)`` float32 in ``(0, 1]``,
* ``edge_sign`` -- ``(E,)`` float32 in ``{-1, +1}``,
* ``num_nodes``, ``modalities`` (the two names, in order) and ``node_ranges``
  (``{modality: (start, stop)}``).

Every builder returns a graph with a self-loop (weight 1, sign +1) on every node,
the reverse of every edge (same weight and sign), no duplicate edges and edges
sorted by (source, target).  :func:`validate_graph` checks a user-supplied graph.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch_geometric.data import Data

from diagvi.checks import check_modality_names
from diagvi.errors import DataError

__all__ = [
    "build_guidance_graph",
    "cross_modal_edges",
    "graph_from_edges",
    "graph_from_mapping",
    "graph_from_shared_names",
    "validate_graph",
]

Features = Mapping[str, Sequence[str]]


def _preview(items, k: int = 5, total: int | None = None, show=repr) -> str:
    """Show up to ``k`` items (``items`` may be longer), then how many more there are."""
    total = len(items) if total is None else total
    shown = ", ".join(show(x.item() if isinstance(x, np.generic) else x) for x in list(items[:k]))
    return shown + (f", ... (+{total - k} more)" if total > k else "")


def _check_features(features: Features) -> tuple[tuple[str, str], list[pd.Index]]:
    """Return the two modality names and their feature names as string indexes."""
    if not isinstance(features, Mapping):
        raise TypeError(
            f"features must be a mapping {{modality: feature_names}}, got {type(features).__name__}"
        )
    if len(features) != 2:
        raise DataError(
            f"features must name exactly 2 modalities, "
            f"got {len(features)}: {_preview(list(features))}; pass the two modalities' var_names"
        )
    check_modality_names(list(features))
    names, indexes = [], []
    for mod, feats in features.items():
        if isinstance(feats, str) or not isinstance(feats, Sequence | np.ndarray | pd.Index):
            raise TypeError(
                f"features[{mod!r}] must be a sequence of feature names, got {type(feats).__name__}"
            )
        idx = pd.Index([str(f) for f in feats], dtype=object)
        if len(idx) == 0:
            raise DataError(f"modality {mod!r} has no features; expected at least one name")
        if not idx.is_unique:
            dup = idx[idx.duplicated()].unique()
            raise DataError(
                f"modality {mod!r} has duplicate feature names: {_preview(dup)}; expected unique "
                "names (adata.var_names_make_unique())"
            )
        names.append(mod)
        indexes.append(idx)
    return (names[0], names[1]), indexes


def _weights_signs(
    n_edges: int, weight, sign, where: str, rows=None
) -> tuple[np.ndarray, np.ndarray]:
    """Broadcast and check edge weights (in (0, 1]) and signs (in {-1, +1}).

    ``rows``: the table row of each edge, named in errors instead of the edge's position.
    """
    out = []
    for label, values in (("weight", weight), ("sign", sign)):
        values = 1.0 if values is None else values
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"{where}: {label} must be numeric ({err}); give numbers, one per edge"
            ) from None
        if arr.ndim > 1 or (arr.ndim == 1 and len(arr) != n_edges):
            raise DataError(
                f"{where}: {label} must be a scalar or have one value per edge "
                f"({n_edges}), got shape {arr.shape}; give one value for all edges or one per edge"
            )
        out.append(np.broadcast_to(arr, (n_edges,)).copy())
    w, s = out
    at = "at edges" if rows is None else "in rows"
    rows = np.arange(n_edges) if rows is None else np.asarray(rows)
    # graphs store float32: a positive weight that rounds to 0 there is a zero-weight edge
    bad_w = np.flatnonzero(~((w.astype(np.float32) > 0) & (w <= 1)))
    if len(bad_w):
        raise DataError(
            f"{where}: weights must lie in (0, 1]; {len(bad_w)} do not, {at} "
            f"{_preview(rows[bad_w])} (values {_preview(w[bad_w])}); rescale them (e.g. divide by "
            "the largest) and drop zero-weight edges"
        )
    bad_s = np.flatnonzero((s != 1) & (s != -1))
    if len(bad_s):
        raise DataError(
            f"{where}: signs must be -1 or +1; {len(bad_s)} are not, {at} "
            f"{_preview(rows[bad_s])} (values {_preview(s[bad_s])}); use +1 for a positive and -1 "
            "for a negative link"
        )
    return w, s


def _finalise(n1: int, n2: int, src, dst, w, s, mods, idx) -> Data:
    """Add reverse edges and self-loops, collapse duplicates (max weight), sort.

    ``src`` indexes modality 1's features and ``dst`` modality 2's (local indices).
    """
    n = n1 + n2
    loops = np.arange(n, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64) + n1
    src = np.asarray(src, dtype=np.int64)
    key = np.concatenate([src * n + dst, dst * n + src, loops * n + loops])
    w = np.concatenate([w, w, np.ones(n)])
    s = np.concatenate([s, s, np.ones(n)])
    order = np.argsort(key, kind="stable")
    key, w, s = key[order], w[order], s[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    sign = np.maximum.reduceat(s, starts)
    conflict = key[starts[np.minimum.reduceat(s, starts) != sign]]
    conflict = conflict[conflict // n < n1]  # each pair once: modality-1 side first
    if len(conflict):
        names = np.concatenate([idx[0].to_numpy(), idx[1].to_numpy()])
        pairs = [f"{names[k // n]}-{names[k % n]}" for k in conflict[:5]]
        raise DataError(
            f"{len(conflict)} {mods[0]}-{mods[1]} feature pairs are given both sign +1 and -1: "
            f"{_preview(pairs, total=len(conflict))}; keep one sign per pair"
        )
    key = key[starts]
    data = Data(
        edge_index=torch.from_numpy(np.stack([key // n, key % n])),
        edge_weight=torch.from_numpy(np.maximum.reduceat(w, starts).astype(np.float32)),
        edge_sign=torch.from_numpy(sign.astype(np.float32)),
        num_nodes=n,
    )
    data.modalities, data.node_ranges = mods, {mods[0]: (0, n1), mods[1]: (n1, n)}
    return data


def _as_indices(values, label: str, mod: str) -> np.ndarray:
    """``values`` as 1-D int64 indices; ``label`` and ``mod`` name them in errors."""
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if arr.size == 0:
        return arr.astype(np.int64).reshape(-1)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(
            f"{label} must hold integer feature indices of modality {mod!r}, got dtype "
            f"{arr.dtype}; convert them with .astype(int)"
        )
    if arr.ndim != 1:
        raise DataError(
            f"{label} must be 1-D (one {mod!r} feature index per edge), got shape {arr.shape}"
        )
    return arr.astype(np.int64)


def graph_from_edges(features: Features, src, dst, weight=None, sign=None) -> Data:
    """Build a guidance graph from index pairs.

    Parameters
    ----------
    features
        Ordered mapping ``{modality: feature_names}`` with exactly two modalities.
    src, dst
        Integer indices into the first and the second modality's features; edge ``i``
        links ``src[i]`` to ``dst[i]``.
    weight, sign
        Scalar or one value per edge; weights in ``(0, 1]`` (default 1), signs
        ``-1`` or ``+1`` (default +1).

    Returns
    -------
    Data
        The symmetric guidance graph with self-loops on every node.

    Raises
    ------
    DataError
        Indices out of range, bad weights or signs, no edge, or conflicting signs.
    TypeError
        Non-integer indices or non-numeric weights/signs.
    """
    mods, idx = _check_features(features)
    src, dst = _as_indices(src, "src", mods[0]), _as_indices(dst, "dst", mods[1])
    if len(src) != len(dst):
        raise DataError(
            f"src and dst must have the same length, got {len(src)} and {len(dst)}; "
            "give one entry per edge in each"
        )
    if len(src) == 0:
        raise DataError(f"no edges given: need at least one {mods[0]}-{mods[1]} edge")
    for label, arr, mod, size in (
        ("src", src, mods[0], len(idx[0])),
        ("dst", dst, mods[1], len(idx[1])),
    ):
        bad = np.flatnonzero((arr < 0) | (arr >= size))
        if len(bad):
            raise DataError(
                f"{label} indexes modality {mod!r} with {size} features, so must lie in "
                f"[0, {size}); {len(bad)} do not: {_preview(arr[bad])}; index the features "
                f"of {mod!r} in their var_names order"
            )
    w, s = _weights_signs(len(src), weight, sign, "graph_from_edges")
    return _finalise(len(idx[0]), len(idx[1]), src, dst, w, s, mods, idx)


def graph_from_shared_names(features: Features) -> Data:
    """Link features with identical names in both modalities (weight 1, sign +1).

    Raises
    ------
    DataError
        If the two modalities share no feature name.
    """
    mods, idx = _check_features(features)
    dst = idx[1].get_indexer(idx[0])
    src = np.flatnonzero(dst >= 0)
    if len(src) == 0:
        raise DataError(
            f"modalities {mods[0]!r} and {mods[1]!r} share no feature name "
            f"(e.g. {_preview(idx[0][:3])} vs {_preview(idx[1][:3])}); "
            "pass a mapping table or explicit edges instead (command line: "
            "data.guidance=mapping data.mapping_path=links.csv)"
        )
    ones = np.ones(len(src))
    return _finalise(len(idx[0]), len(idx[1]), src, dst[src], ones, ones, mods, idx)


def graph_from_mapping(features: Features, mapping, on_missing: str = "raise") -> Data:
    """Build a guidance graph from a table of feature-name pairs.

    Parameters
    ----------
    features
        Ordered mapping ``{modality: feature_names}`` with exactly two modalities.
    mapping
        :class:`pandas.DataFrame`, or path to a CSV file, with one column named after
        each modality and optional ``weight`` and ``sign`` columns.  One-to-many and
        many-to-one links are allowed; rows missing either name are skipped.
    on_missing
        ``"raise"`` (default) for names not among the modality's features, or
        ``"ignore"`` to drop those rows with a warning.

    Returns
    -------
    Data
        The symmetric guidance graph with self-loops on every node.

    Raises
    ------
    DataError
        Missing or repeated columns, unknown names, bad weights/signs, no usable row, or
        an unknown ``on_missing``.
    TypeError
        If ``mapping`` is neither a DataFrame nor a path.
    """
    mods, idx = _check_features(features)
    if on_missing not in ("raise", "ignore"):
        raise DataError(f"on_missing must be 'raise' or 'ignore', got {on_missing!r}")
    if isinstance(mapping, str | Path):
        where = f"mapping file {str(mapping)!r}"
        mapping = pd.read_csv(mapping, dtype={mods[0]: str, mods[1]: str})
    elif isinstance(mapping, pd.DataFrame):
        where = "mapping table"
    else:
        raise TypeError(f"mapping must be a DataFrame or a CSV path, got {type(mapping).__name__}")
    repeated = mapping.columns[mapping.columns.duplicated()].unique()
    if len(repeated):
        raise DataError(
            f"{where} has repeated column(s) {_preview(list(repeated))}; expected one column "
            "per modality: rename or drop the copies"
        )
    absent = [m for m in mods if m not in mapping.columns]
    if absent:
        raise DataError(
            f"{where} lacks column(s) {_preview(absent)}: expected one column per modality "
            f"{list(mods)} (optionally 'weight', 'sign'); "
            f"present: {list(map(str, mapping.columns))}"
        )
    table = mapping.dropna(subset=list(mods))
    keep = np.ones(len(table), dtype=bool)
    pos = []
    for mod, feats in zip(mods, idx, strict=True):
        names = table[mod].astype(str).to_numpy()
        p = feats.get_indexer(names)
        if pd.api.types.is_float_dtype(table[mod]):
            # pandas holds integer names as floats in a column with a missing name (1 -> 1.0):
            # match those the float spelling misses by their integer spelling
            values = table[mod].to_numpy(dtype=np.float64)
            retry = (p < 0) & np.isfinite(values) & (values == np.round(values))
            names[retry] = [str(int(v)) for v in values[retry]]
            p[retry] = feats.get_indexer(names[retry])
        unknown = pd.unique(names[p < 0])
        if len(unknown):
            hints = []
            for u in unknown[:5]:
                close = difflib.get_close_matches(u, feats, n=1)
                hints.append(f"{u!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            msg = (
                f"{where}: {len(unknown)} name(s) in column {mod!r} are not features of "
                f"modality {mod!r}: {_preview(hints, total=len(unknown), show=str)}"
            )
            fix = (
                "; fix the names or pass on_missing='ignore' (command line: "
                "data.on_missing=ignore) to drop those rows"
            )
            if on_missing == "raise":
                raise DataError(msg + fix)
            warnings.warn(msg + "; ignoring those rows", UserWarning, stacklevel=2)
        keep &= p >= 0
        pos.append(p)
    if not keep.any():
        raise DataError(
            f"{where} has no row linking a {mods[0]!r} to a {mods[1]!r} feature; expected at "
            f"least one row naming a feature of each modality in columns {list(mods)}"
        )
    cols = []
    for col in ("weight", "sign"):
        if col not in table.columns:
            cols.append(None)
            continue
        v = pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=np.float64)[keep]
        if np.isnan(v).any():
            rows = table.index[keep][np.isnan(v)]
            raise DataError(
                f"{where}: column {col!r} is missing or not numeric in rows {_preview(rows)}; "
                "expected a number in every row"
            )
        cols.append(v)
    w, s = _weights_signs(int(keep.sum()), cols[0], cols[1], where, rows=table.index[keep])
    return _finalise(len(idx[0]), len(idx[1]), pos[0][keep], pos[1][keep], w, s, mods, idx)


def _as_numpy(graph: Data, key: str) -> np.ndarray:
    value = graph[key]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise TypeError(f"graph.{key} must be a torch.Tensor, got {type(value).__name__}")


def _in_feature_order(
    graph: Data, ei: np.ndarray, mods: tuple[str, str], sizes: tuple[int, int]
) -> np.ndarray:
    """``edge_index`` numbered as ``mods`` (first modality first).

    A graph that names its modalities (``modalities``, as :func:`build_guidance_graph` sets)
    is checked against the data's and renumbered when it was built in the other order; a graph
    without names is taken to follow ``mods``.
    """
    built = graph.get("modalities")
    if built is None:
        return ei
    built = tuple(str(m) for m in built)
    if sorted(built) != sorted(mods):
        raise DataError(
            f"guidance graph was built for modalities {list(built)}, but the data's are "
            f"{list(mods)}; build it from these modalities' features"
        )
    ranges = graph.get("node_ranges") or {}
    for mod, size in zip(mods, sizes, strict=True):
        if mod in ranges and ranges[mod][1] - ranges[mod][0] != size:
            lo, hi = ranges[mod]
            raise DataError(
                f"guidance graph has {hi - lo} nodes for {mod!r}, whose data have {size} "
                "features; build it from these data's var_names"
            )
    if built == mods or ((ei < 0) | (ei >= sum(sizes))).any():  # out of range: checked below
        return ei
    # built as (mods[1], mods[0]): its first sizes[1] nodes are mods[1]'s features
    return np.where(ei < sizes[1], ei + sizes[0], ei - sizes[1])


def validate_graph(graph: Data, features: Features) -> Data:
    """Check a user-supplied guidance graph against the features.

    The graph must have ``edge_index``, ``edge_weight`` and ``edge_sign``,
    ``num_nodes == G1 + G2`` (the first modality's features first; a graph whose
    ``modalities`` name them in the other order is renumbered), in-range integer indices,
    weights in ``(0, 1]``, signs ``-1``/``+1``, a sign +1 self-loop on every node, the
    reverse of every edge with the same weight and sign, no duplicate edge and at least one
    cross-modal edge.

    Returns
    -------
    Data
        A copy (the input is not modified) with int64/float32 tensors and
        ``modalities``/``node_ranges`` set; edge order is kept.

    Raises
    ------
    TypeError
        If ``graph`` is not a :class:`~torch_geometric.data.Data` or holds non-tensors.
    DataError
        For any failed check; the message names the offending nodes or edges.
    """
    if not isinstance(graph, Data):
        raise TypeError(f"graph must be a torch_geometric.data.Data, got {type(graph).__name__}")
    mods, idx = _check_features(features)
    n1, n2 = len(idx[0]), len(idx[1])
    n = n1 + n2
    absent = [k for k in ("edge_index", "edge_weight", "edge_sign") if graph.get(k) is None]
    if absent:
        raise DataError(
            f"guidance graph lacks {', '.join(absent)}; expected edge_index (2, E), edge_weight "
            "(E,) in (0, 1] and edge_sign (E,) in {-1, +1}: set them, or build the graph with "
            "diagvi.build_guidance_graph"
        )
    ei, w, s = (_as_numpy(graph, k) for k in ("edge_index", "edge_weight", "edge_sign"))
    if (
        ei.ndim != 2
        or ei.shape[0] != 2
        or ei.dtype == bool
        or not np.issubdtype(ei.dtype, np.integer)
    ):
        raise DataError(
            f"edge_index must be an integer array of shape (2, E), got {ei.dtype} {ei.shape}; "
            "convert it with .long() (and transpose an (E, 2) array)"
        )
    ei = _in_feature_order(graph, ei, mods, (n1, n2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyG warns when it infers num_nodes from edge_index
        num_nodes = graph.num_nodes
    if num_nodes != n:
        raise DataError(
            f"guidance graph has {num_nodes} nodes but the features number {n} "
            f"({n1} {mods[0]!r} + {n2} {mods[1]!r}); expected one node per feature, "
            f"those of {mods[0]!r} first"
        )
    e = ei.shape[1]
    for key, arr in (("edge_weight", w), ("edge_sign", s)):
        if arr.shape != (e,) or not np.issubdtype(arr.dtype, np.number):
            raise DataError(
                f"{key} must be a numeric array of shape ({e},), got {arr.dtype} {arr.shape}; "
                "give one value per edge"
            )
    w, s = _weights_signs(e, w, s, "guidance graph")
    row, col = ei.astype(np.int64)
    bad = np.flatnonzero((row < 0) | (row >= n) | (col < 0) | (col >= n))
    if len(bad):
        raise DataError(
            f"edge_index must lie in [0, {n}); {len(bad)} edges do not, "
            f"at positions {_preview(bad)}; number the nodes of {mods[0]!r}, then {mods[1]!r}"
        )
    names = np.concatenate([idx[0].to_numpy(), idx[1].to_numpy()])
    has_loop = np.zeros(n, dtype=bool)
    has_loop[row[(row == col) & (s > 0)]] = True
    if not has_loop.all():
        miss = np.flatnonzero(~has_loop)
        raise DataError(
            f"guidance graph needs a sign +1 self-loop on every node; {len(miss)} lack one: "
            f"{_preview(names[miss])}; add them (weight 1, sign +1)"
        )
    key = row * n + col
    order = np.argsort(key, kind="stable")
    skey = key[order]
    dup = skey[1:][skey[1:] == skey[:-1]]
    if len(dup):
        dup = np.unique(dup)
        pairs = [f"{names[k // n]}->{names[k % n]}" for k in dup[:5]]
        raise DataError(
            f"guidance graph has {len(dup)} duplicated edges (each must appear once): "
            f"{_preview(pairs, total=len(dup))}; keep one copy of each"
        )
    pos = np.minimum(np.searchsorted(skey, col * n + row), e - 1)
    rev = order[pos]
    asym = (skey[pos] != col * n + row) | (s[rev] != s) | ~np.isclose(w[rev], w, rtol=1e-6, atol=0)
    if asym.any():
        bad = np.flatnonzero(asym)
        pairs = [f"{names[row[i]]}->{names[col[i]]}" for i in bad[:5]]
        raise DataError(
            "guidance graph must be symmetric (each edge's reverse present with the same "
            f"weight and sign); {len(bad)} edges are not: {_preview(pairs, total=len(bad))}; "
            "add the reverse edges"
        )
    if not ((row < n1) & (col >= n1)).any():
        raise DataError(
            f"guidance graph has no edge between {mods[0]!r} and {mods[1]!r} features; expected "
            "at least one, which is what links the modalities"
        )
    out = graph.clone()
    out.edge_index = torch.as_tensor(np.stack([row, col]), dtype=torch.int64)
    out.edge_weight = torch.as_tensor(w, dtype=torch.float32)
    out.edge_sign = torch.as_tensor(s, dtype=torch.float32)
    out.num_nodes = n
    out.modalities = mods
    out.node_ranges = {mods[0]: (0, n1), mods[1]: (n1, n)}
    return out


def build_guidance_graph(
    features: Features,
    graph: Data | None = None,
    mapping=None,
    edges=None,
    on_missing: str = "raise",
) -> Data:
    """Build or validate the guidance graph from whichever source is given.

    Parameters
    ----------
    features
        Ordered mapping ``{modality: feature_names}`` with exactly two modalities.
    graph
        A ready :class:`~torch_geometric.data.Data`, checked by :func:`validate_graph`.
    mapping
        DataFrame or CSV path, see :func:`graph_from_mapping`.
    edges
        DataFrame of feature names (as ``mapping``) or a tuple
        ``(src, dst[, weight[, sign]])`` of index arrays (see :func:`graph_from_edges`).
    on_missing
        Passed to :func:`graph_from_mapping`.

    Returns
    -------
    Data
        The guidance graph; with no source, features sharing a name are linked.

    Raises
    ------
    TypeError
        If more than one source is given or ``edges`` has an unsupported type.
    DataError
        As raised by the builder used.
    """
    given = [
        k for k, v in (("graph", graph), ("mapping", mapping), ("edges", edges)) if v is not None
    ]
    if len(given) > 1:
        raise TypeError(f"pass at most one of graph, mapping, edges; got {', '.join(given)}")
    if graph is not None:
        return validate_graph(graph, features)
    if mapping is not None:
        return graph_from_mapping(features, mapping, on_missing=on_missing)
    if isinstance(edges, pd.DataFrame):
        return graph_from_mapping(features, edges, on_missing=on_missing)
    if isinstance(edges, tuple | list) and 2 <= len(edges) <= 4:
        return graph_from_edges(features, *edges)
    if edges is not None:
        raise TypeError(
            "edges must be a DataFrame of feature names or a tuple (src, dst[, weight[, sign]]), "
            f"got {type(edges).__name__}"
        )
    return graph_from_shared_names(features)


def cross_modal_edges(graph: Data) -> int:
    """Count edges linking the two modalities, each undirected edge once."""
    if not isinstance(graph, Data) or graph.get("node_ranges") is None:
        raise TypeError("graph must be a Data built by diagvi.graph (with node_ranges)")
    start2 = list(graph.node_ranges.values())[1][0]
    row, col = graph.edge_index.cpu().numpy().astype(np.int64)
    cross = (row < start2) != (col < start2)
    lo, hi = np.minimum(row[cross], col[cross]), np.maximum(row[cross], col[cross])
    return int(len(np.unique(lo * int(graph.num_nodes) + hi)))
