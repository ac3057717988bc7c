"""Saving and loading helpers: atomic writes, the guidance graph as plain data, feature checks."""

from __future__ import annotations

import os
import tempfile
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
    """Inverse of :func:`graph_to_dict` (validate it again with the data it is used with)."""
    return Data(
        edge_index=saved["edge_index"],
        edge_weight=saved["edge_weight"],
        edge_sign=saved["edge_sign"],
        num_nodes=saved["num_nodes"],
    )


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


def atomic_write(target: Path, write: Callable[[str], object]) -> None:
    """Write via a temporary file in the same folder, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}"
    )
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
