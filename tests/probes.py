"""Test-only Lightning callbacks that ``python -m diagvi.train`` subprocesses load through Hydra.

The tests put this folder on ``PYTHONPATH`` and add a probe with e.g.
``+callbacks.seen._target_=probes.SeenCells +callbacks.seen.folder=<dir>``; every training
process (every DDP rank, every joblib worker) then writes what it observed into ``folder``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L
import numpy as np
import scipy.sparse as sp
import torch


def _row_keys(X) -> dict[bytes, int]:
    """``{row bytes: row index}``; raises on duplicate rows (a cell could not be identified)."""
    dense = X.toarray() if sp.issparse(X) else np.asarray(X)
    keys = {row.tobytes(): i for i, row in enumerate(dense)}
    if len(keys) != len(dense):
        raise ValueError("duplicate rows: cells cannot be told apart by their values")
    return keys


class SeenCells(L.Callback):
    """Writes ``rank_<global rank>.json``: the cells (row indices) of each training minibatch.

    A minibatch holds values, not indices: each row is found in the datamodule's matrix by its
    exact values (the synthetic data has no duplicate rows). Also records the world size, the
    process group's backend, the training indices, the steps and the final ``val/loss``.
    """

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.seen: dict[int, dict[str, list[int]]] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        data = trainer.datamodule.data
        self.keys = {m: _row_keys(d.X) for m, d in data.items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        epoch = self.seen.setdefault(trainer.current_epoch, {m: [] for m in batch})
        for m, tensors in batch.items():
            rows = tensors["x"].detach().cpu().numpy()
            epoch[m].extend(self.keys[m][row.tobytes()] for row in rows)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dist = torch.distributed
        val_loss = trainer.callback_metrics.get("val/loss")
        record = {
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "global_step": trainer.global_step,
            "train_idx": {m: v.tolist() for m, v in trainer.datamodule.train_idx.items()},
            "seen": self.seen,
            "val_loss": None if val_loss is None else float(val_loss),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"rank_{trainer.global_rank}.json"
        path.write_text(json.dumps(record))


class Rendezvous(L.Callback):
    """Waits at the start of training until ``parties`` processes have arrived in ``folder``.

    Proves that runs overlap in time: runs one after another never meet, and each then gives up
    after ``timeout`` seconds. Writes ``<folder>/met_<pid>.json`` with whether it met the others.
    """

    def __init__(self, folder: str, parties: int, timeout: float = 120.0) -> None:
        self.folder, self.parties, self.timeout = Path(folder), parties, timeout

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"arrived_{os.getpid()}").touch()
        deadline = time.monotonic() + self.timeout
        while len(list(self.folder.glob("arrived_*"))) < self.parties:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        met = len(list(self.folder.glob("arrived_*"))) >= self.parties
        record = {"pid": os.getpid(), "met": met}
        (self.folder / f"met_{os.getpid()}.json").write_text(json.dumps(record))
