"""LightningModule: weighs the module's loss terms, sums, logs them, and optimises."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from diagvi.module import Batch, DiagVAE


class _DropLightningAdvert(logging.Filter):
    """Drop Lightning's advertisement for its cloud logger, printed by every ``Trainer``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


# Neither message is about the user's run: each ``fit`` printed the advertisement, and
# Lightning's own pytree helper warns under torch 2.13 on every first step.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropLightningAdvert())
warnings.filterwarnings(
    "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
)

# A term's weight is chosen by the part of its name before "/".
WEIGHT_OF_TERM = {
    "nll": "lam_data",
    "kl": "lam_kl",
    "spread": "lam_spread",
    "graph": "lam_graph",
    "link": "lam_link",
    "self": "lam_self",
    "align": "lam_sinkhorn",
    "cls": "lam_class",
}
DEFAULT_WEIGHTS = {
    "lam_data": 0.1,
    "lam_kl": 0.1,
    "lam_spread": 0.1,
    "lam_graph": 15.0,
    "lam_link": 75.0,
    "lam_self": 25.0,
    "lam_sinkhorn": 170.0,
    "lam_class": 5.0,
}
# what a training step does when a loss term is NaN or infinite
NONFINITE_ACTIONS = ("raise", "skip")


def term_weights(names: Iterable[str], weights: Mapping[str, float]) -> list[float]:
    """``weights[WEIGHT_OF_TERM[kind(t)]]`` for each term ``t``: the only place loss weights act."""
    return [weights[WEIGHT_OF_TERM[name.split("/")[0]]] for name in names]


def stack_terms(terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The scalar loss terms as one float32 vector, in the mapping's order.

    One vector rather than a dozen scalars: weighing, checking and summing it are a few
    operations instead of a few per term, which on a CPU, where a small minibatch's step is
    over a thousand operations of microseconds each, is a measurable share.
    """
    return torch.stack([value.float() for value in terms.values()])


def weigh(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """``sum_t weights[WEIGHT_OF_TERM[kind(t)]] * terms[t]``."""
    values = stack_terms(terms)
    return values @ values.new_tensor(term_weights(terms, weights))


_FUSED_ADAM_DEVICES = ("cpu", "cuda", "mps")
# kinds of terms that average the cells of the modality named after "/"
PER_CELL_KINDS = frozenset({"nll", "kl", "spread", "cls", "link", "self"})


def _group(name: str) -> str:
    """The modality whose cells term ``name`` averages, or "" (the larger modality's)."""
    kind, _, modality = name.partition("/")
    return modality if kind in PER_CELL_KINDS else ""


class DiagVILightning(L.LightningModule):
    """Trains a :class:`~diagvi.module.DiagVAE` with Adam.

    Parameters
    ----------
    module
        The model.
    weights
        Loss weights ``lam_data``, ``lam_kl``, ``lam_spread``, ``lam_graph``, ``lam_link``,
        ``lam_self``, ``lam_sinkhorn``, ``lam_class``.
    lr, weight_decay
        Adam settings.
    nonfinite
        When a loss term of a training step is NaN or infinite: ``raise`` a
        ``FloatingPointError`` naming the terms, the step and the epoch (the last checkpoint
        written before it is kept), or ``skip`` the step (no update) and count it in
        ``train/skipped_steps``.
    logged
        Names of the epoch means (``"train/loss"``, ``"val/align"``, ...) handed to Lightning's
        ``self.log``, which loggers, the progress bar and callbacks' monitors read; ``None``:
        all. :attr:`epoch_means` keeps every one of the current (or last) epoch either way.
        ``self.log`` costs 0.3-1 ms per name and epoch: with 15 names, a tenth of an epoch of
        one small minibatch.
    """

    def __init__(
        self,
        module: DiagVAE,
        weights: Mapping[str, float] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        nonfinite: str = "raise",
        logged: Collection[str] | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        unknown = set(self.weights) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(
                f"unknown loss weights {sorted(unknown)}; expected {sorted(DEFAULT_WEIGHTS)}"
            )
        if nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"nonfinite must be one of {NONFINITE_ACTIONS}, got {nonfinite!r}")
        self.lr, self.weight_decay, self.nonfinite = lr, weight_decay, nonfinite
        self.skipped_steps = 0
        self.logged = None if logged is None else frozenset(logged)
        self.epoch_means: dict[str, torch.Tensor] = {}
        # per stage: {term names: running cell-weighted sum of the terms}, {group: cells} with
        # group a modality or "" (the larger modality of each minibatch)
        self._epoch_sums: dict[str, tuple[dict[tuple[str, ...], torch.Tensor], dict[str, int]]] = {}
        self._size_vectors: dict[tuple, torch.Tensor] = {}
        self._weight_vectors: dict[tuple[tuple[str, ...], torch.device], torch.Tensor] = {}
        self._base_seed: int | None = None
        self.save_hyperparameters(ignore=["module", "logged"])

    def _step(self, batch: Batch, stage: str) -> torch.Tensor | None:
        terms = self.module.loss_terms(batch)
        names = tuple(terms)
        values = stack_terms(terms)
        loss = values @ self._weight_vector(names, values)
        if stage == "train":
            # a non-finite term makes the weighted sum non-finite: one check (and one host
            # sync) per step; the culprits are looked up only then
            bad = []
            if not torch.isfinite(loss):
                bad = [
                    f"train/{k}"
                    for k, v in zip(names, values, strict=True)
                    if not torch.isfinite(v)
                ]
                bad = bad or ["train/loss"]
            # under DDP every rank must skip together, or the gradient all-reduce hangs
            if self._any_rank(bool(bad)):
                self._nonfinite(bad or ["train/loss (on another rank)"])
                return None  # Lightning skips backward and the optimizer step
        cells = {m: len(b["x"]) for m, b in batch.items()}
        self._accumulate(stage, names, values.detach(), cells)
        return loss

    def _weight_vector(self, names: tuple[str, ...], like: torch.Tensor) -> torch.Tensor:
        """The terms' weights as a vector on ``like``'s device, made once per set of terms."""
        key = (names, like.device)
        if key not in self._weight_vectors:
            self._weight_vectors[key] = like.new_tensor(term_weights(names, self.weights))
        return self._weight_vectors[key]

    def _any_rank(self, flag: bool) -> bool:
        if self._trainer is None or self.trainer.world_size == 1:
            return flag
        return bool(self.trainer.strategy.reduce_boolean_decision(flag, all=False))

    # Terms are summed here and logged once per epoch: Lightning's self.log costs about a
    # millisecond per call and key (it walks all logged results each time), which on small
    # minibatches was 15% of the training time; and only the `logged` ones.
    def _accumulate(
        self, stage: str, names: tuple[str, ...], values: torch.Tensor, cells: Mapping[str, int]
    ) -> None:
        """Add the terms ``names`` (``values``), each times the cells it averages, to the sums.

        ``cells``: the minibatch's cells per modality. A term of one modality (``nll/<m>``,
        ``kl/<m>``, ``spread/<m>``, ``cls/<m>``, ``link/<m>``, ``self/<m>``) weighs by that
        modality's cells, any other by the larger modality's.
        """
        sums, counts = self._epoch_sums.setdefault(stage, ({}, {"": 0}))
        groups = (("", max(cells.values(), default=0)), *cells.items())
        key = (names, groups, values.device)
        sizes = self._size_vectors.get(key)
        if sizes is None:
            if len(self._size_vectors) > 256:  # minibatch sizes vary only in odd loaders
                self._size_vectors.clear()
            by_group = dict(groups)
            sizes = values.new_tensor([by_group.get(_group(n), groups[0][1]) for n in names])
            self._size_vectors[key] = sizes
        sums[names] = values * sizes if names not in sums else sums[names].addcmul_(values, sizes)
        for group, n in groups:
            counts[group] = counts.get(group, 0) + n

    def _log_epoch(self, stage: str) -> None:
        """Keep and log the epoch's mean of every term over the cells it averages as
        ``<stage>/<term>``, and the weighted sum of these means as ``<stage>/loss``."""
        sums, counts = self._epoch_sums.pop(stage, ({}, {"": 0}))
        if self._trainer is not None and self.trainer.sanity_checking:
            return  # a few batches of the untrained model: no epoch of the history
        totals: dict[str, torch.Tensor] = {}
        for names, vector in sums.items():  # one set of terms unless some steps lacked one
            for name, value in zip(names, vector, strict=True):
                totals[name] = totals[name] + value if name in totals else value
        # the sums and the cell counts (last) are summed over ranks before dividing: ranks may
        # hold different numbers of cells (the epoch's short last minibatch), and a mean of
        # their means would weigh cells unequally
        groups = list(counts)
        values = torch.stack(
            [
                torch.as_tensor(v, device=self.device).float()
                for v in (*totals.values(), *counts.values())
            ]
        )
        if self._trainer is not None and self.trainer.world_size > 1:
            # every rank keeps and logs the mean over all ranks, in one all-reduce
            values = self.trainer.strategy.reduce(values, reduce_op="sum")
        # a term missing from some steps counts as 0 on their cells
        index = [groups.index(g) if (g := _group(n)) in counts else 0 for n in totals]
        denominators = values[len(totals) :][values.new_tensor(index, dtype=torch.long)]
        mean = values[: len(totals)] / denominators.clamp_min(1)
        means = {f"{stage}/{k}": v for k, v in zip(totals, mean, strict=True)}
        if totals:
            means[f"{stage}/loss"] = mean @ mean.new_tensor(term_weights(totals, self.weights))
        if stage == "train":  # the same on every rank: the ranks skip steps together
            means["train/skipped_steps"] = values.new_tensor(float(self.skipped_steps))
        if not means:
            return
        self.epoch_means.update(means)
        if self.logged is not None:
            means = {k: v for k, v in means.items() if k in self.logged}
        if means:
            # batch_size: each value is logged once per epoch, already a mean over its cells;
            # Lightning would otherwise infer one from the current minibatch, and warn when
            # its modalities differ in size
            self.log_dict(means, on_step=False, on_epoch=True, batch_size=1)

    def _nonfinite(self, terms: list[str]) -> None:
        """Count the step (``nonfinite="skip"``) or raise a ``FloatingPointError``."""
        if self.nonfinite == "skip":
            self.skipped_steps += 1
            self._reset_nonfinite_statistics()
            return
        callback = self.trainer.checkpoint_callback if self._trainer is not None else None
        dirpath = getattr(callback, "dirpath", None)
        last = Path(dirpath) / "last.ckpt" if dirpath else None
        if last is not None and last.is_file():
            kept = f"the last good checkpoint is kept ({last})"
        elif last is not None:
            kept = f"no checkpoint was written yet ({last} appears after the first epoch)"
        else:
            kept = "no checkpoint callback is configured (callbacks=default keeps last.ckpt)"
        raise FloatingPointError(
            f"non-finite loss term(s) {', '.join(terms)} at global step {self.global_step}, "
            f"epoch {self.current_epoch}; training stopped and {kept}. Try a smaller model.lr, "
            "trainer.gradient_clip_val, or model.nonfinite=skip to skip such steps"
        )

    def _reset_nonfinite_statistics(self) -> None:
        """Restart the running statistics a skipped step's forward made non-finite.

        The forward runs before the step is found bad: a NaN latent has by then entered the
        classifier's batch-norm statistics, which evaluation would use from then on. They
        start again (the classifier corrects a young average for its start).
        """
        for m in self.module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                stats = torch.stack([m.running_mean.sum(), m.running_var.sum()])
                if not bool(torch.isfinite(stats).all()):
                    m.reset_running_stats()

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        loss = self._step(batch, "train")
        # logged at the epoch's last step rather than in on_train_epoch_end, which Lightning
        # runs after the callbacks' (the history, the progress bar) have read the metrics
        if batch_idx + 1 >= self.trainer.num_training_batches:
            self._log_epoch("train")
        return loss

    def on_train_epoch_start(self) -> None:
        # this epoch's means only: an epoch without validation has no val/ values; and this
        # epoch's sums only, not those an earlier fit left when it stopped mid-epoch
        self.epoch_means.clear()
        self._epoch_sums.pop("train", None)

    def on_train_epoch_end(self) -> None:
        if "train" in self._epoch_sums:  # an epoch cut short, e.g. by trainer.max_steps
            self._log_epoch("train")

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def on_validation_epoch_start(self) -> None:
        self._epoch_sums.pop("val", None)  # e.g. left over from an interrupted sanity check

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # fused: one kernel per parameter tensor for the whole update (3-4x faster than
        # foreach on CPU, where foreach falls back to a kernel per tensor per operation);
        # not with gradient clipping under mixed precision (trainer=gpu), which Lightning
        # refuses for optimizers that unscale gradients themselves, as fused Adam does
        clipped_amp = (
            self._trainer is not None
            and bool(self.trainer.gradient_clip_val)
            and isinstance(self.trainer.precision_plugin, MixedPrecision)
        )
        fused = self.device.type in _FUSED_ADAM_DEVICES and not clipped_amp
        return torch.optim.Adam(
            self.parameters(),
            lr=self.lr,
            weight_decay=self.weight_decay,
            fused=fused or None,
            foreach=None if fused else True,
        )

    # Each epoch's random stream (sampling of z, dropout) is seeded from (base seed, epoch) at
    # its first batch, as PairedSampler.set_epoch does for the batch order: a run resumed from
    # an end-of-epoch checkpoint then matches an uninterrupted one (Lightning saves no RNG
    # state, and draws from torch's RNG at different points when it resumes).
    def on_fit_start(self) -> None:
        # Lightning leaves the modules' mode as it finds it: after an earlier fit (or
        # inference), the model is in eval mode, and dropout and batch statistics would be off
        self.train()
        if self._base_seed is None:
            self._base_seed = torch.initial_seed()

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        if batch_idx == 0:
            if self._base_seed is None:  # a checkpoint of an older diagvi
                self._base_seed = torch.initial_seed()
            key = [self._base_seed, self.current_epoch]
            if self.trainer.world_size > 1:  # independent noise and dropout on every rank
                key.append(self.global_rank)
            state = np.random.SeedSequence(key).generate_state(2)
            seed = int(state[0]) << 32 | int(state[1])
            if self.device.type == "cpu":  # torch.manual_seed also visits every other
                torch.default_generator.manual_seed(seed)  # backend: 1.6 ms an epoch
            else:
                torch.manual_seed(seed)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["diagvi"] = {"base_seed": self._base_seed, "skipped_steps": self.skipped_steps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("diagvi") or {}
        self.skipped_steps = int(saved.get("skipped_steps", 0))
        self._base_seed = saved.get("base_seed", self._base_seed)


class HistoryCallback(L.Callback):
    """Collects every ``train/`` and ``val/`` epoch mean of :class:`DiagVILightning` (logged
    or not) at the end of each epoch."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "train" in getattr(pl_module, "_epoch_sums", {}):
            # an epoch cut short (trainer.max_steps) logs its means in the module's
            # on_train_epoch_end, which Lightning runs after this one
            pl_module._log_epoch("train")
        self.rows.append({k: float(v) for k, v in pl_module.epoch_means.items()})

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rows)
        df.index.name = "epoch"
        return df[sorted(df.columns)]
