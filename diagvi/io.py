"""Saving and loading helpers: atomic writes, the guidance graph as plain data, feature checks."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from torch_geometric.data import Data

from diagvi.errors import DataError


def graph_to_dict(graph: Data) -> dict:
    """The guidance graph as tensors, lists and numbers (loadable with ``weights_only=True``)."""
    return {
        "edge_index": graph.edge_index.clone(),
        "edge_weight": graph.edge_weight.clone(),
        "edge_sign": graph.edge_sign.clone(),
        "num_nodes": int(graph.num_nodes),
        "modalities": list(graph.modalities),
        "node_ranges": {m: list(r) for m, r in graph.node_ranges.items()},
    }


def graph_from_dict(saved: dict) -> Data:
    """Inverse of :func:`graph_to_dict` (validate it again with the data it is used with).

    The modality names and node ranges come back too: with them,
    :func:`diagvi.graph.validate_graph` renumbers the graph for modalities given in the other
    order instead of reading each modality's nodes as the other's.
    """
    graph = Data(
        edge_index=saved["edge_index"],
        edge_weight=saved["edge_weight"],
        edge_sign=saved["edge_sign"],
        num_nodes=saved["num_nodes"],
    )
    if "modalities" in saved:
        graph.modalities = tuple(saved["modalities"])
        graph.node_ranges = {m: tuple(r) for m, r in saved["node_ranges"].items()}
    return graph


def check_features(name: str, expected: list[str], given: pd.Index) -> None:
    """DataError naming the modality and the first mismatching features."""
    given = [str(g) for g in given]
    if given == expected:
        return
    if len(given) != len(expected):
        raise DataError(
            f"modality {name!r}: the model was trained on {len(expected)} features, the AnnData "
            f"has {len(given)}; subset/reorder it to the training var_names"
        )
    bad = [i for i, (a, b) in enumerate(zip(expected, given, strict=True)) if a != b][:5]
    pairs = ", ".join(f"#{i}: expected {expected[i]!r}, got {given[i]!r}" for i in bad)
    raise DataError(
        f"modality {name!r}: var_names differ from the training features ({pairs}); "
        "use the same features in the same order"
    )


def temporary_file(target: Path) -> str:
    """A new empty file next to ``target``, to be written and then moved onto it (``os.replace``).

    The file gets the permissions a plain write would give ``target``: those of the file it
    replaces, else ``0o666`` less the umask (not ``tempfile.mkstemp``'s owner-only ``0o600``,
    which would hide saved models and checkpoints from the user's group). Its name keeps
    ``target``'s suffix, for writers that append one to other names (``np.save``).
    """
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = None
    while True:
        tmp = str(target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp{target.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # less the umask
            break
        except FileExistsError:
            continue
    try:
        if mode is not None:
            os.chmod(tmp, mode)
    except BaseException:
        os.remove(tmp)
        raise
    return tmp


def atomic_write(target: Path, write: Callable[[str], object]) -> None:
    """Write via a temporary file in the same folder (:func:`temporary_file`), then
    ``os.replace``; the temporary file is removed when ``write`` fails."""
    tmp = temporary_file(target)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
