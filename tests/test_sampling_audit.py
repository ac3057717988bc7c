"""Audit of the training data path: splits by name, paired sampling across ranks, epoch means
and resuming."""

from __future__ import annotations

import math
from types import SimpleNamespace

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from diagvi.data import (
    ModalitySetup,
    PairedDataModule,
    PairedSampler,
    read_modalities,
    shared_order,
)
from diagvi.lit import DiagVILightning, HistoryCallback


def quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        logger=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------
# splits


def paired_adatas(n, rna_batches):
    obs = pd.DataFrame({"b": rna_batches}, index=[f"c{i}" for i in range(n)])
    X = np.random.default_rng(0).poisson(2.0, (n, 3)).astype(np.float32) + 1
    var = pd.DataFrame(index=["f0", "f1", "f2"])
    return {
        "rna": ad.AnnData(X, obs=obs, var=var),
        "protein": ad.AnnData(X.copy(), obs=pd.DataFrame(index=obs.index), var=var),
    }


@pytest.mark.parametrize("seed", range(4))
def test_cell_kept_for_training_in_one_modality_is_not_validated_in_the_other(seed):
    n, fraction = 20, 0.3
    names = pd.Index([f"c{i}" for i in range(n)])
    first = names[shared_order({"rna": names, "protein": names}, seed)["rna"][0]]
    # the held-out cell ranked first is alone in its RNA batch: it must train in RNA
    batches = np.where(names == first, "rare", "common")
    adatas = paired_adatas(n, batches)
    data, _ = read_modalities(
        adatas, {"rna": ModalitySetup(batch_key="b"), "protein": ModalitySetup()}
    )
    dm = PairedDataModule(data, val_fraction=fraction, seed=seed)
    train = {k: set(data[k].obs_names[dm.train_idx[k]]) for k in data}
    val = {k: set(data[k].obs_names[dm.val_idx[k]]) for k in data}
    assert first in train["rna"]
    assert val["rna"] == val["protein"]  # the same cells: held out in both or in neither
    assert not val["protein"] & train["rna"] and not val["rna"] & train["protein"]
    for k in data:
        assert len(train[k]) + len(val[k]) == n and not train[k] & val[k]


# ---------------------------------------------------------------------------------------------
# PairedSampler across ranks


def test_sampler_ranks_exhaustive_small():
    for n in range(1, 13):
        for n_other in sorted({1, max(1, n // 2), n}):
            indices = {"a": np.arange(n) + 100, "b": np.arange(n_other)}
            for bs in range(1, 7):
                for world in range(1, 6):
                    samplers = [PairedSampler(indices, bs, True, 7, world, r) for r in range(world)]
                    shards = [list(s) for s in samplers]
                    n_global = math.ceil(n / bs)
                    steps = math.ceil(n_global / world)
                    case = (n, n_other, bs, world)
                    assert [len(s) for s in samplers] == [steps] * world, case
                    assert [len(s) for s in shards] == [steps] * world, case
                    for shard in shards:
                        for b in shard:
                            assert len(b["b"]) == min(len(b["a"]), n_other), case
                    # the global minibatches, dealt round robin, hold each cell once
                    dealt = [shards[i % world][i // world]["a"] for i in range(n_global)]
                    np.testing.assert_array_equal(np.sort(np.concatenate(dealt)), indices["a"])
                    # the rest is padding: minibatches of the epoch repeated
                    padding = [
                        s[-1]["a"]
                        for r, s in enumerate(shards)
                        if r >= n_global - (steps - 1) * world
                    ]
                    for p in padding:
                        assert any(np.array_equal(p, d) for d in dealt), case


# ---------------------------------------------------------------------------------------------
# epoch means


class Toy(torch.nn.Module):
    """``nll/rna`` = mean squared norm of the minibatch's cells; NaN on the calls ``bad``."""

    def __init__(self, bad=()) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.bad, self.calls = set(bad), 0

    def loss_terms(self, batch):
        nll = ((batch["rna"]["x"] - self.w) ** 2).sum(-1).mean()
        if self.calls in self.bad:
            nll = nll * float("nan")
        self.calls += 1
        return {"nll/rna": nll}


def constant_batches(sizes):
    """Minibatch ``i``: ``sizes[i]`` cells all equal to ``i`` (nll ``3 i^2``)."""
    return [{"rna": {"x": torch.full((s, 3), float(i))}} for i, s in enumerate(sizes)]


class FakeStrategy:
    """Reduces across simulated ranks: the other ranks' inputs are given, call by call."""

    def __init__(self, others):
        self.others, self.calls = others, []

    def reduce(self, x, reduce_op="mean"):
        i = len(self.calls)
        self.calls.append(x.clone())
        stacked = torch.stack([x, *(o[i] for o in self.others)])
        return stacked.sum(0) if reduce_op == "sum" else stacked.mean(0)


def rank_lit(sizes_values, others):
    lit = DiagVILightning(Toy(), logged=())
    strategy = FakeStrategy(others)
    lit._trainer = SimpleNamespace(sanity_checking=False, world_size=2, strategy=strategy)
    for size, value in sizes_values:
        lit._accumulate("val", ("nll/rna",), torch.tensor([value]), {"rna": size})
    lit._log_epoch("val")
    return lit, strategy


def test_ddp_epoch_means_weigh_cells_not_ranks():
    rank1 = [(4, 1.0), (1, 11.0)]  # the rank left with the epoch's short last minibatch
    _, strategy1 = rank_lit(rank1, [])
    lit0, _ = rank_lit([(4, 1.0), (4, 1.0)], [strategy1.calls])
    expected = (4 + 4 + 4 + 11) / 13
    assert float(lit0.epoch_means["val/nll/rna"]) == pytest.approx(expected)
    assert float(lit0.epoch_means["val/loss"]) == pytest.approx(0.1 * expected)


def test_a_failed_fit_leaves_no_stale_sums_in_the_next():
    batches = constant_batches([8, 8, 8, 8])
    lit = DiagVILightning(Toy(bad={6}), lr=0.0)  # epoch 1 fails at its third minibatch
    with pytest.raises(FloatingPointError):
        quiet_trainer(max_epochs=2, limit_val_batches=0, enable_checkpointing=False).fit(
            lit, DataLoader(batches, batch_size=None)
        )
    lit.module.bad = set()
    quiet_trainer(max_epochs=1, limit_val_batches=0, enable_checkpointing=False).fit(
        lit, DataLoader(batches, batch_size=None)
    )
    assert float(lit.epoch_means["train/nll/rna"]) == pytest.approx(3 * (0 + 1 + 4 + 9) / 4)


def test_history_keeps_the_means_of_an_epoch_cut_short_by_max_steps():
    batches = constant_batches([8, 8, 8, 2])
    lit = DiagVILightning(Toy(), lr=0.0)
    history = HistoryCallback()
    trainer = quiet_trainer(
        max_steps=6, limit_val_batches=0, enable_checkpointing=False, callbacks=[history]
    )
    trainer.fit(lit, DataLoader(batches, batch_size=None))
    full = 3 * (8 * 0 + 8 * 1 + 8 * 4 + 2 * 9) / 26  # weighted by cells
    assert [row.get("train/nll/rna") for row in history.rows] == pytest.approx([full, 1.5])


# ---------------------------------------------------------------------------------------------
# resuming


class Noisy(torch.nn.Module):
    """Draws from torch's RNG (noise, dropout) in every step, and reads both modalities."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.drop = torch.nn.Dropout(0.5)

    def loss_terms(self, batch):
        x = batch["rna"]["x"]
        nll = ((self.drop(x + torch.randn_like(x)) - self.w) ** 2).sum(-1).mean()
        return {"nll/rna": nll, "kl/rna": self.w.pow(2).sum() * batch["protein"]["x"].mean()}


class Rows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = {
            "rna": torch.randn(50, 3, generator=g),
            "protein": torch.randn(20, 3, generator=g),
        }

    def __getitem__(self, idx):
        return {k: {"x": self.x[k][torch.as_tensor(i)]} for k, i in idx.items()}


def fit_noisy(epochs, folder, ckpt_path=None, seed=0):
    def loader(shuffle):
        indices = {"rna": np.arange(50), "protein": np.arange(20)}
        return DataLoader(Rows(), sampler=PairedSampler(indices, 8, shuffle, 3), batch_size=None)

    L.seed_everything(seed, verbose=False)
    lit = DiagVILightning(Noisy(), lr=0.1)
    trainer = quiet_trainer(
        max_epochs=epochs, callbacks=[ModelCheckpoint(dirpath=folder, save_last=True)]
    )
    trainer.fit(lit, loader(True), loader(False), ckpt_path=ckpt_path)
    return lit.module.w.detach().clone()


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    straight = fit_noisy(4, tmp_path / "straight")
    fit_noisy(2, tmp_path / "resumed")
    # another global seed in the new process: the run's own seed comes from the checkpoint
    resumed = fit_noisy(4, tmp_path / "resumed", tmp_path / "resumed" / "last.ckpt", seed=1)
    assert torch.equal(straight, resumed)
    assert not torch.equal(straight, fit_noisy(4, tmp_path / "other", seed=1))
