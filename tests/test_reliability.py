"""Reliability of training runs: non-finite losses, reproducibility, resuming, checkpoints.

The ``python -m diagvi.train`` runs are tiny subprocesses started together by one fixture;
each test waits only for the runs it checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from diagvi.checkpoint import AtomicCheckpointIO, CheckpointError, resolve_ckpt_path
from diagvi.lit import DiagVILightning
from diagvi.train import PROVENANCE_PACKAGES

# ----------------------------------------------------------------------------- non-finite loss


class Toy(torch.nn.Module):
    """A stand-in for DiagVAE whose ``nll/rna`` term is NaN on the training calls ``bad``."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.bad, self.calls = bad, 0

    def loss_terms(self, batch):
        nll = ((batch["rna"]["x"] - self.w) ** 2).sum(-1).mean()
        if self.calls in self.bad:
            nll = nll * float("nan")
        self.calls += 1
        return {"nll/rna": nll, "kl/rna": self.w.pow(2).sum()}


def fit_toy(
    bad: set[int], nonfinite: str, tmp_path: Path, epochs: int = 2, logged=None
) -> DiagVILightning:
    batches = [{"rna": {"x": torch.randn(8, 3) + 1.0}} for _ in range(4)]
    lit = DiagVILightning(Toy(bad), nonfinite=nonfinite, lr=0.1, logged=logged)
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(lit, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return lit


def test_nonfinite_loss_raises_naming_term_step_and_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError) as err:
        fit_toy({6}, "raise", tmp_path)  # epoch 1, its third batch
    message = str(err.value)
    assert "train/nll/rna" in message and "train/kl/rna" not in message, message
    assert "global step 6" in message and "epoch 1" in message, message
    assert str(tmp_path / "checkpoints" / "last.ckpt") in message, message
    # the checkpoint of the last good epoch is kept
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 4 and torch.isfinite(saved["state_dict"]["module.w"]).all()


def test_nonfinite_loss_skip_counts_and_skips_updates(tmp_path):
    lit = fit_toy({1, 2, 5}, "skip", tmp_path)
    assert lit.skipped_steps == 3
    assert float(lit.trainer.callback_metrics["train/skipped_steps"]) == 3.0
    assert torch.isfinite(lit.module.w).all()
    # a skipped step changes no weight (no gradients: Adam leaves the parameters alone)
    frozen = fit_toy(set(range(8)), "skip", tmp_path / "all_bad")
    assert frozen.skipped_steps == 8
    assert torch.equal(frozen.module.w.detach(), torch.zeros(3))


class Normed(Toy):
    """A Toy whose terms pass through a batch norm; its input is NaN on the calls ``bad``."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__(bad)
        self.norm = torch.nn.BatchNorm1d(3)

    def loss_terms(self, batch):
        z = batch["rna"]["x"] - self.w
        if self.calls in self.bad:
            z = z * float("nan")
        self.calls += 1
        return {"nll/rna": self.norm(z).pow(2).sum(-1).mean(), "kl/rna": self.w.pow(2).sum()}


def test_skipped_step_leaves_no_nonfinite_running_statistics():
    """A NaN forward reaches the batch-norm statistics before the step is skipped; they are
    restarted, and the later steps fill them again."""
    lit = DiagVILightning(Normed({1}), nonfinite="skip", lr=0.1)
    batch = {"rna": {"x": torch.randn(8, 3) + 1.0}}
    for _ in range(3):
        lit._step(batch, "train")
    norm = lit.module.norm
    assert lit.skipped_steps == 1
    assert torch.isfinite(norm.running_mean).all() and torch.isfinite(norm.running_var).all()
    assert int(norm.num_batches_tracked) == 1  # the step after the skipped one
    assert float(norm.running_mean.abs().sum()) > 0


def test_only_the_logged_means_reach_lightning_and_all_are_kept(tmp_path):
    lit = fit_toy(set(), "raise", tmp_path, logged=["train/loss"])
    assert set(lit.trainer.callback_metrics) == {"train/loss"}
    kept = {"train/loss", "train/nll/rna", "train/kl/rna", "train/skipped_steps"}
    assert set(lit.epoch_means) == kept
    assert float(lit.epoch_means["train/loss"]) == float(lit.trainer.callback_metrics["train/loss"])
    everything = fit_toy(set(), "raise", tmp_path / "all")
    assert set(everything.trainer.callback_metrics) == kept


class Sometimes(Toy):
    """A Toy whose ``link/rna`` term (2.0) exists on every other call only."""

    def loss_terms(self, batch):
        terms = super().loss_terms(batch)
        if self.calls % 2:
            terms["link/rna"] = torch.tensor(2.0)
        return terms


def test_epoch_means_count_a_missing_term_as_zero_and_weigh_to_the_loss(tmp_path):
    batches = [{"rna": {"x": torch.randn(8, 3) + 1.0}} for _ in range(4)]
    lit = DiagVILightning(Sometimes(set()), lr=0.1)
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(lit, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    means = {k: float(v) for k, v in lit.epoch_means.items()}
    assert means["train/link/rna"] == pytest.approx(1.0)  # 2.0 on half of the cells
    weights = lit.weights
    expected = (
        weights["lam_data"] * means["train/nll/rna"]
        + weights["lam_kl"] * means["train/kl/rna"]
        + weights["lam_link"] * means["train/link/rna"]
    )
    assert means["train/loss"] == pytest.approx(expected, rel=1e-5)


def test_nonfinite_option_is_checked():
    with pytest.raises(ValueError, match="nonfinite"):
        DiagVILightning(Toy(set()), nonfinite="ignore")


# ----------------------------------------------------------------------------- checkpoints


def test_ckpt_path_resolution(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert resolve_ckpt_path(None, tmp_path) is None
    with pytest.raises(FileNotFoundError, match=str(last)):
        resolve_ckpt_path("last", tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.ckpt")):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), tmp_path)
    last.parent.mkdir()
    last.write_bytes(b"x")
    assert resolve_ckpt_path("last", tmp_path) == str(last)
    assert resolve_ckpt_path(str(tmp_path), tmp_path / "elsewhere") == str(last)  # a run dir
    assert resolve_ckpt_path(str(last), tmp_path) == str(last)


def test_ckpt_path_in_the_home_directory(tmp_path, monkeypatch):
    # `ckpt_path: ~/runs/a` in a config file reaches diagvi unexpanded: it looked for a
    # folder named "~" in the working directory
    last = tmp_path / "runs" / "a" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"x")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_ckpt_path("~/runs/a", tmp_path / "run") == str(last)
    assert resolve_ckpt_path("~/runs/a/checkpoints/last.ckpt", tmp_path / "run") == str(last)


def test_empty_ckpt_path_is_refused(tmp_path, monkeypatch):
    """``ckpt_path=`` (an empty string) is not the working directory's last checkpoint."""
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)  # a checkpoint an empty path would have resumed
    for value in ("", " "):
        with pytest.raises(ValueError, match="ckpt_path is empty"):
            resolve_ckpt_path(value, tmp_path / "run")


def test_atomic_checkpoint_io_round_trip_and_bad_files(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "a.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, path)
    assert [p.name for p in path.parent.iterdir()] == ["a.ckpt"]  # no temporary file left
    assert io.load_checkpoint(path)["epoch"] == 3
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=str(garbage)):
        io.load_checkpoint(garbage)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.ones(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        io.load_checkpoint(foreign)


# ----------------------------------------------------------------------------- end to end

TINY = [
    "data=synthetic",
    "logger=none",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "data.load.n_cells=120",
    "data.load.n_genes=30",
    "data.load.n_proteins=8",
    "data.batch_size=32",
    "model.n_latent=4",
    "model.encoder.n_hidden=16",
]


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "diagvi.train", *TINY, *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(
        cmd,
        cwd=run_dir.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, ok: bool = True) -> str:
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"diagvi.train timed out:\n{out[-3000:]}")
    if ok:
        assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two equal 2-epoch runs, a 4-epoch run, a 2-epoch run to resume, a corrupt resume."""
    base = tmp_path_factory.mktemp("reliability")
    dirs = {name: base / name for name in ("same1", "same2", "straight", "resumed", "corrupt")}
    garbage = dirs["corrupt"] / "checkpoints" / "last.ckpt"
    garbage.parent.mkdir(parents=True)
    garbage.write_bytes(b"\x00garbage, not a checkpoint")
    procs = {
        "same1": start(dirs["same1"], "callbacks=none", "trainer.max_epochs=2"),
        "same2": start(dirs["same2"], "callbacks=none", "trainer.max_epochs=2"),
        "straight": start(dirs["straight"], "callbacks=default", "trainer.max_epochs=4"),
        "first_half": start(dirs["resumed"], "callbacks=default", "trainer.max_epochs=2"),
        "corrupt": start(
            dirs["corrupt"],
            "callbacks=default",
            "trainer.max_epochs=1",
            f"ckpt_path={base}/corrupt",
        ),
    }
    yield dirs, procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def latents(run_dir: Path) -> dict[str, np.ndarray]:
    return {
        m: ad.read_h5ad(run_dir / f"latent_{m}.h5ad").obsm["X_diagvi"] for m in ("rna", "protein")
    }


def test_same_seed_same_latents_and_provenance(runs):
    dirs, procs = runs
    finish(procs["same1"])
    finish(procs["same2"])
    first, second = latents(dirs["same1"]), latents(dirs["same2"])
    for m in first:
        np.testing.assert_array_equal(first[m], second[m])
    prov = json.loads((dirs["same1"] / "provenance.json").read_text())
    assert prov["seed"] == 0 and prov["resumed_from"] is None
    assert set(prov["packages"]) == set(PROVENANCE_PACKAGES)
    assert prov["packages"]["torch"] == torch.__version__
    assert prov["git_commit"] is None or len(prov["git_commit"]) == 40


def test_resume_from_last_matches_straight_run(runs):
    dirs, procs = runs
    finish(procs["first_half"])
    assert (dirs["resumed"] / "checkpoints" / "last.ckpt").is_file()
    out = finish(
        start(dirs["resumed"], "callbacks=default", "trainer.max_epochs=4", "ckpt_path=last")
    )
    last = dirs["resumed"] / "checkpoints" / "last.ckpt"
    assert f"Restored all states from the checkpoint at {last}" in out, out[-3000:]
    prov = json.loads((dirs["resumed"] / "provenance.json").read_text())
    assert prov["resumed_from"] == str(last)
    finish(procs["straight"])
    assert json.loads((dirs["resumed"] / "metrics.json").read_text())["epochs"] == 4
    straight, resumed = latents(dirs["straight"]), latents(dirs["resumed"])
    for m in straight:
        np.testing.assert_allclose(resumed[m], straight[m], atol=1e-4, rtol=0)


def test_resume_from_corrupt_checkpoint_names_file(runs):
    dirs, procs = runs
    out = finish(procs["corrupt"], ok=False)
    assert procs["corrupt"].returncode != 0
    assert f"cannot read checkpoint {dirs['corrupt'] / 'checkpoints' / 'last.ckpt'}" in out, out[
        -3000:
    ]
    assert not (dirs["corrupt"] / "metrics.json").exists()
