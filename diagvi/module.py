"""DiagVAE: the DiagVI generative model in pure PyTorch; returns named, unweighted loss terms."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.distributions import Distribution, Normal

from diagvi.data import DataSpec
from diagvi.nn import BilinearDecoder, Encoder

Batch = Mapping[str, Mapping[str, torch.Tensor]]


class DiagVAE(nn.Module):
    """One VAE per modality sharing a latent space, with feature embeddings from a graph encoder.

    Per modality ``m``: ``q(z|x)`` by an MLP encoder (x2z) on the likelihood's transform of
    ``x``; ``eta = softplus(alpha_s) * z v_m^T + beta_s`` (z2x) with ``v_m`` the embeddings of
    ``m``'s features (g2v); ``p(x|eta)`` by the modality's likelihood.

    Loss terms (per minibatch, unweighted): ``nll/<m>`` negative log-likelihood summed over
    features, averaged over cells; ``kl/<m>`` KL of ``z`` summed over latent dimensions,
    averaged over cells and divided by the number of features of ``m`` (as scvi-tools'
    DIAGVI, so ``lam_kl`` is comparable across modalities of very different width);
    ``graph/nll`` and ``graph/kl`` the per-edge graph ELBO; ``align`` the alignment divergence
    between the two modalities' posterior means; ``cls/<m>`` cross-entropy on labelled cells
    (when labels exist).

    Parameters
    ----------
    spec
        Data sizes and the guidance graph.
    n_latent
        Latent dimension of cells and features.
    likelihoods
        ``{modality: factory(n_features, n_batches)}``.
    prior
        ``factory(n_latent, n_labels)``.
    graph_encoder
        ``factory(graph, n_latent)``.
    alignment
        Alignment loss module.
    classifier
        ``factory(n_latent, n_labels)``, used only when the data have labels.
    encoder
        Keyword arguments of :class:`diagvi.nn.Encoder` (``n_hidden``, ``n_layers``, ``dropout``).
    """

    def __init__(
        self,
        spec: DataSpec,
        n_latent: int,
        likelihoods: Mapping[str, Callable[..., nn.Module]],
        prior: Callable[..., nn.Module],
        graph_encoder: Callable[..., nn.Module],
        alignment: nn.Module,
        classifier: Callable[..., nn.Module] | None = None,
        encoder: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.names = tuple(spec.modalities)
        self.node_ranges = dict(spec.graph.node_ranges)
        mods = spec.modalities
        self.x2z = nn.ModuleDict(
            {m: Encoder(s.n_features, n_latent, **(encoder or {})) for m, s in mods.items()}
        )
        self.z2x = nn.ModuleDict(
            {m: BilinearDecoder(s.n_features, s.n_batches) for m, s in mods.items()}
        )
        self.likelihood = nn.ModuleDict(
            {
                m: likelihoods[m](n_features=s.n_features, n_batches=s.n_batches)
                for m, s in mods.items()
            }
        )
        self.g2v = graph_encoder(spec.graph, n_latent)
        self.prior = prior(n_latent, spec.n_labels)
        self.alignment = alignment
        self.classifier = (
            classifier(n_latent, spec.n_labels) if classifier and spec.n_labels else None
        )

    def feature_embedding(self, name: str, v: torch.Tensor) -> torch.Tensor:
        start, stop = self.node_ranges[name]
        return v[start:stop]

    def encode(self, name: str, x: torch.Tensor) -> Normal:
        """``q(z|x)`` of modality ``name``."""
        library = x.sum(-1, keepdim=True)
        return self.x2z[name](self.likelihood[name].transform(x, library))

    def decode(
        self,
        name: str,
        z: torch.Tensor,
        v: torch.Tensor,
        batch: torch.Tensor,
        library: torch.Tensor,
    ) -> Distribution:
        """``p(x|z)`` of modality ``name`` given all feature embeddings ``v``."""
        eta = self.z2x[name](z, self.feature_embedding(name, v), batch)
        return self.likelihood[name](eta, batch, library)

    def loss_terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Named, unweighted loss terms of one paired minibatch."""
        qv = self.g2v()
        v = qv.rsample()
        terms: dict[str, torch.Tensor] = {}
        zs: dict[str, torch.Tensor] = {}
        for name in self.names:
            x, b, y = batch[name]["x"], batch[name]["batch"], batch[name]["label"]
            qz = self.encode(name, x)
            z = qz.rsample()
            px = self.decode(name, z, v, b, x.sum(-1, keepdim=True))
            terms[f"nll/{name}"] = -px.log_prob(x).sum(-1).mean()
            terms[f"kl/{name}"] = self.prior.kl(qz, z, y).mean() / x.shape[-1]
            if self.classifier is not None:
                terms[f"cls/{name}"] = self.classifier.loss(z, y)
            zs[name] = qz.loc  # align the posterior means: the embedding users get
        terms.update({f"graph/{k}": t for k, t in self.g2v.loss(qv, v).items()})
        terms["align"] = self.alignment(zs)
        return terms
