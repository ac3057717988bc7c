"""Classifiers predicting cell labels from the latent ``z``; they output logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diagvi.registry import CLASSIFIERS


class Classifier(nn.Module):
    """Base class: ``forward(z) -> logits``; ``loss`` is cross-entropy over labelled cells."""

    def loss(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over cells with ``label >= 0``; zero when none is labelled."""
        known = labels >= 0
        logits = self(z[known])
        if logits.shape[0] == 0:
            return z.sum() * 0.0  # keeps the graph connected for optimisers and DDP
        return F.cross_entropy(logits, labels[known])


@CLASSIFIERS.register("linear")
class LinearClassifier(Classifier):
    """Multinomial logistic regression on ``z``."""

    def __init__(self, n_latent: int, n_labels: int) -> None:
        super().__init__()
        self.net = nn.Linear(n_latent, n_labels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


@CLASSIFIERS.register("mlp")
class MLPClassifier(Classifier):
    """One hidden layer; for label structure that is not linearly separable in ``z``."""

    def __init__(
        self, n_latent: int, n_labels: int, n_hidden: int = 64, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_latent, n_hidden),
            nn.LeakyReLU(0.2),
            nn.Dropout(dropout),
            nn.Linear(n_hidden, n_labels),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)
