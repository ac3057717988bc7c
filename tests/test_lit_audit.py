"""Audit of diagvi.lit: epoch means of per-modality terms weigh that modality's cells."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from diagvi.lit import DiagVILightning


class TwoModalities(torch.nn.Module):
    """``nll/<m>``: mean of modality ``m``'s cells; ``align``: 1 per minibatch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def loss_terms(self, batch):
        terms = {f"nll/{m}": (b["x"] + self.w).mean() for m, b in batch.items()}
        terms["align"] = torch.ones(()) + 0 * self.w
        return terms


def batches(rna_sizes, protein_sizes):
    """Minibatch ``i``: cells all ``i`` (rna) and ``10 + i`` (protein)."""
    return [
        {
            "rna": {"x": torch.full((r, 1), float(i))},
            "protein": {"x": torch.full((p, 1), 10.0 + i)},
        }
        for i, (r, p) in enumerate(zip(rna_sizes, protein_sizes, strict=True))
    ]


def fit(data, lr: float = 0.0, **kwargs) -> DiagVILightning:
    lit = DiagVILightning(TwoModalities(), lr=lr)
    L.Trainer(
        logger=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        max_epochs=1,
        **kwargs,
    ).fit(lit, DataLoader(data, batch_size=None))
    return lit


def test_per_modality_epoch_means_weigh_that_modalitys_cells():
    # protein has fewer cells than the batch size; both end on a short minibatch
    rna, protein = [8, 8, 2], [3, 3, 2]
    means = {k: float(v) for k, v in fit(batches(rna, protein)).epoch_means.items()}
    assert means["train/nll/rna"] == pytest.approx((8 * 0 + 8 * 1 + 2 * 2) / 18)
    assert means["train/nll/protein"] == pytest.approx((3 * 10 + 3 * 11 + 2 * 12) / 8)
    assert means["train/align"] == pytest.approx(1.0)
    w = DiagVILightning(TwoModalities()).weights
    expected = w["lam_data"] * (means["train/nll/rna"] + means["train/nll/protein"])
    assert means["train/loss"] == pytest.approx(expected + w["lam_sinkhorn"], rel=1e-6)


class SumOverRanks:
    """A strategy whose ``reduce`` adds the other simulated rank's inputs, call by call."""

    def __init__(self, other: list[torch.Tensor]) -> None:
        self.other, self.calls = other, []

    def reduce(self, x, reduce_op="mean"):
        assert reduce_op == "sum"
        self.calls.append(x.clone())
        return x + self.other[len(self.calls) - 1] if self.other else x


def test_ddp_per_modality_means_take_one_all_reduce():
    def rank(data, other):
        lit = DiagVILightning(TwoModalities(), logged=())
        strategy = SumOverRanks(other)
        lit._trainer = SimpleNamespace(sanity_checking=False, world_size=2, strategy=strategy)
        for b in data:
            lit._step(b, "val")
        lit._log_epoch("val")
        return lit, strategy

    _, rank1 = rank(batches([8, 2], [3, 1])[1:], [])  # the short last minibatch
    lit0, rank0 = rank(batches([8], [3]), rank1.calls)
    assert len(rank0.calls) == 1
    means = {k: float(v) for k, v in lit0.epoch_means.items()}
    assert means["val/nll/rna"] == pytest.approx((8 * 0 + 2 * 1) / 10)
    assert means["val/nll/protein"] == pytest.approx((3 * 10 + 1 * 11) / 4)
    assert means["val/align"] == pytest.approx(1.0)


def test_gradient_clipping_under_mixed_precision_trains():
    """trainer=gpu (bf16-mixed) with trainer.gradient_clip_val: Lightning refuses to clip for a
    fused Adam, which unscales gradients itself; bf16-mixed runs on the CPU too."""
    lit = fit(batches([8, 8, 2], [3, 3, 2]), lr=0.1, precision="bf16-mixed", gradient_clip_val=1.0)
    assert float(lit.module.w) == pytest.approx(-0.3, abs=1e-3)  # three Adam steps of lr
    # w = 0, -0.1, -0.2 at the three steps
    expected = (8 * 0 + 8 * 0.9 + 2 * 1.8) / 18
    assert float(lit.epoch_means["train/nll/rna"]) == pytest.approx(expected, abs=0.02)


def test_logging_the_epoch_means_infers_no_batch_size(recwarn):
    """Logged at the epoch's last step, whose modalities differ in size: Lightning warned
    about an ambiguous batch size on every such fit."""
    lit = fit(batches([8, 8, 8], [3, 3, 3]))
    assert lit.trainer.callback_metrics["train/loss"] == lit.epoch_means["train/loss"]
    ambiguous = [w for w in recwarn if "ambiguous" in str(w.message)]
    assert not ambiguous, [str(w.message) for w in ambiguous]
