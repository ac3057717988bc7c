"""LightningModule: weighs the module's loss terms, sums, logs them, and optimises."""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import pandas as pd
import torch

from diagvi.module import Batch, DiagVAE

# A term's weight is chosen by the part of its name before "/".
WEIGHT_OF_TERM = {
    "nll": "lam_data",
    "kl": "lam_kl",
    "graph": "lam_graph",
    "link": "lam_link",
    "align": "lam_sinkhorn",
    "cls": "lam_class",
}
DEFAULT_WEIGHTS = {
    "lam_data": 0.1,
    "lam_kl": 0.1,
    "lam_graph": 15.0,
    "lam_link": 75.0,
    "lam_sinkhorn": 85.0,
    "lam_class": 5.0,
}


def weigh(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """``sum_t weights[WEIGHT_OF_TERM[kind(t)]] * terms[t]``: the only place loss weights act."""
    return sum(weights[WEIGHT_OF_TERM[name.split("/")[0]]] * value for name, value in terms.items())


class DiagVILightning(L.LightningModule):
    """Trains a :class:`~diagvi.module.DiagVAE` with Adam.

    Parameters
    ----------
    module
        The model.
    weights
        Loss weights ``lam_data``, ``lam_kl``, ``lam_graph``, ``lam_link``, ``lam_sinkhorn``,
        ``lam_class``.
    lr, weight_decay
        Adam settings.
    """

    def __init__(
        self,
        module: DiagVAE,
        weights: Mapping[str, float] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.module = module
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        unknown = set(self.weights) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(
                f"unknown loss weights {sorted(unknown)}; expected {sorted(DEFAULT_WEIGHTS)}"
            )
        self.lr, self.weight_decay = lr, weight_decay
        self.save_hyperparameters(ignore=["module"])

    def _step(self, batch: Batch, stage: str) -> torch.Tensor:
        terms = self.module.loss_terms(batch)
        loss = weigh(terms, self.weights)
        size = max(len(b["x"]) for b in batch.values())
        logged = {f"{stage}/{k}": v.detach() for k, v in terms.items()}
        logged[f"{stage}/loss"] = loss.detach()
        self.log_dict(logged, on_step=False, on_epoch=True, batch_size=size, prog_bar=False)
        return loss

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class HistoryCallback(L.Callback):
    """Collects every logged ``train/`` and ``val/`` value at the end of each epoch."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        row = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(("train/", "val/"))
        }
        self.rows.append(row)

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rows)
        df.index.name = "epoch"
        return df[sorted(df.columns)]
