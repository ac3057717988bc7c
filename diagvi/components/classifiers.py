"""Classifiers predicting cell labels from the latent ``z``; they output logits."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diagvi.nn import Dropout
from diagvi.registry import CLASSIFIERS


class Classifier(nn.Module):
    """Base class: ``logits = logit_scale * head(standardised z)``; ``loss`` is cross-entropy.

    ``z`` is standardised per dimension (batch statistics in training, running ones in
    evaluation: :meth:`standardise`; nothing learned) and the head's output multiplied by a
    fixed ``logit_scale``, as in normalised-softmax classifiers. Both make the classifier
    independent of the latent's scale, which the other loss terms set and which is often
    small (posterior means with a standard deviation of about 0.1). Adam moves each weight by
    about the learning rate per step, so a head on raw ``z`` (it would need weights in the
    tens) or with unit logits stayed near chance within a run;
    ``experiments/alignment_defaults`` has the evidence for 10.
    """

    def __init__(self, n_latent: int, logit_scale: float = 10.0) -> None:
        super().__init__()
        if not (math.isfinite(logit_scale) and logit_scale > 0):  # NaN passed `<= 0`
            raise ValueError(f"logit_scale must be positive and finite, got {logit_scale}")
        self.logit_scale = float(logit_scale)
        self.norm = nn.BatchNorm1d(n_latent, eps=1e-6, affine=False)
        self.head: nn.Module = nn.Identity()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.head(self.standardise(z))

    def standardise(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` standardised per dimension: by the batch in training, else by running statistics.

        The running statistics start at mean 0 and variance 1 and move by ``momentum`` per
        training batch, so after ``t`` batches the start still weighs ``(1 - momentum)^t``
        (0.81 after two, 0.12 after twenty): after two batches of a latent at 5 +- 0.1, it
        was standardised with a mean of 0.95 and a variance of 0.81. That weight is divided
        out, as Adam corrects its moments, which leaves the momentum-weighted average of the
        training batches' statistics (the same as BatchNorm's after a few hundred batches).
        """
        norm = self.norm
        if self.training or norm.momentum is None or norm.running_mean is None:
            return norm(z)
        start = (1.0 - norm.momentum) ** int(norm.num_batches_tracked)
        if start >= 1.0:  # never trained: the starting statistics are all there is
            return norm(z)
        mean = norm.running_mean / (1.0 - start)
        var = ((norm.running_var - start) / (1.0 - start)).clamp_min(0.0)
        return (z - mean) * (var + norm.eps).rsqrt()

    def loss(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over cells with ``label >= 0``.

        Zero when fewer than two cells are labelled (in training, one cell has no batch
        statistics to standardise with).
        """
        known = labels >= 0
        if int(known.sum()) < (2 if self.training else 1):
            # zero, connected to z and to every parameter: under DDP (find_unused_parameters
            # off) a parameter without a gradient fails the next step's reduction
            unused = sum(p.sum() for p in self.parameters())
            return (z.sum() + unused) * 0.0
        return F.cross_entropy(self(z[known]), labels[known])


@CLASSIFIERS.register("linear")
class LinearClassifier(Classifier):
    """Multinomial logistic regression on the standardised ``z``."""

    def __init__(self, n_latent: int, n_labels: int, logit_scale: float = 10.0) -> None:
        super().__init__(n_latent, logit_scale)
        self.head = nn.Linear(n_latent, n_labels)


@CLASSIFIERS.register("mlp")
class MLPClassifier(Classifier):
    """One hidden layer; for label structure that is not linearly separable in ``z``."""

    def __init__(
        self,
        n_latent: int,
        n_labels: int,
        n_hidden: int = 64,
        dropout: float = 0.1,
        logit_scale: float = 10.0,
    ) -> None:
        super().__init__(n_latent, logit_scale)
        self.head = nn.Sequential(
            nn.Linear(n_latent, n_hidden),
            nn.LeakyReLU(0.2),
            Dropout(dropout),
            nn.Linear(n_hidden, n_labels),
        )
