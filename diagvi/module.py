"""DiagVAE: the DiagVI generative model in pure PyTorch; returns named, unweighted loss terms."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.distributions import Distribution, Normal

from diagvi.data import DataSpec, ModalityData
from diagvi.linked import LinkedView
from diagvi.nn import BilinearDecoder, Encoder, PrincipalComponents

Batch = Mapping[str, Mapping[str, torch.Tensor]]


class DiagVAE(nn.Module):
    """One VAE per modality sharing a latent space, with feature embeddings from a graph encoder.

    Per modality ``m``: ``q(z|x)`` by an MLP encoder (x2z) on the likelihood's transform of
    ``x`` (or on its top principal components, :attr:`pcs`, with ``encoder_pcs``);
    ``eta = softplus(alpha_s) * z v_m^T + beta_s`` (z2x) with ``v_m`` the embeddings of
    ``m``'s features (g2v); ``p(x|eta)`` by the modality's likelihood.

    Loss terms (per minibatch, unweighted): ``nll/<m>`` negative log-likelihood summed over
    features, averaged over cells; ``kl/<m>`` KL of ``z`` summed over latent dimensions and
    averaged over cells (the ELBO's own KL: with ``lam_kl = lam_data`` the two terms are the
    negative ELBO; scvi-tools' DIAGVI divides it by the number of features, which leaves the
    latent scale free, see ``experiments/alignment_defaults``); ``spread/<m>`` a floor under
    each latent dimension's spread (:func:`spread_kl`; minibatches of at least
    :data:`SPREAD_MIN_CELLS` cells); ``graph/nll`` and
    ``graph/kl`` the per-edge graph ELBO; ``link/<m>`` the guidance graph's statement about
    cells (:meth:`link_consistency`); ``align`` the alignment divergence between the two
    modalities' posterior means; ``cls/<m>`` cross-entropy on labelled cells (when labels
    exist).

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
        self.pcs = nn.ModuleDict(
            {
                m: PrincipalComponents(s.n_features, s.encoder_pcs)
                for m, s in mods.items()
                if s.encoder_pcs is not None
            }
        )
        self.x2z = nn.ModuleDict(
            {
                m: Encoder(s.encoder_pcs or s.n_features, n_latent, **(encoder or {}))
                for m, s in mods.items()
            }
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
        self.linked = LinkedView(spec.graph)
        self._register_consistency_pairs()

    def _register_consistency_pairs(self) -> None:
        """Per modality ``m``, the (feature embedding, measured column) pairs that the ``link``
        and ``self`` terms correlate, and how each term weighs them, as buffers: the linked
        features of the other modality against ``m``'s end of each edge, then ``m``'s own
        features against themselves. Both terms of a modality are then one correlation call.
        """
        view, names = self.linked, list(self.node_ranges)
        ends = {names[0]: view.index_a, names[1]: view.index_b}
        norm = view.weight / view.weight.sum()
        for name, other in zip(names, names[::-1], strict=True):
            (start, stop), other_start = self.node_ranges[name], self.node_ranges[other][0]
            own = torch.arange(stop - start)
            n_edges, n_own = len(ends[name]), len(own)
            weights = torch.zeros(2, n_edges + n_own)
            weights[0, :n_edges] = norm * view.sign  # link: sum_e w_e s_e corr_e / sum_e w_e
            weights[1, n_edges:] = 1.0 / max(n_own, 1)  # self: the mean over own features
            pairs = {
                "nodes": torch.cat([ends[other] + other_start, own + start]),
                "columns": torch.cat([ends[name], own]),
                "weights": weights,
            }
            for key, value in pairs.items():
                self.register_buffer(f"_consistency_{key}_{name}", value, persistent=False)

    def feature_embedding(self, name: str, v: torch.Tensor) -> torch.Tensor:
        start, stop = self.node_ranges[name]
        return v[start:stop]

    def encode(self, name: str, x: torch.Tensor) -> Normal:
        """``q(z|x)`` of modality ``name``."""
        return self.x2z[name](self.encoder_input(name, self.transform(name, x)))

    def encoder_input(self, name: str, transformed: torch.Tensor) -> torch.Tensor:
        """What modality ``name``'s encoder reads: its transformed input, or the top principal
        components of it (:attr:`pcs`)."""
        return self.pcs[name](transformed) if name in self.pcs else transformed

    def transform(
        self, name: str, x: torch.Tensor, library: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The encoder's input: the likelihood's transform of ``x`` (e.g. log1p of CP10k).

        ``library``: ``x``'s per-cell totals (cells x 1), when already summed."""
        if library is None:
            library = x.sum(-1, keepdim=True)
        return self.likelihood[name].transform(x, library)

    def linked_features(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality's cells in the guidance graph's shared coordinates (:mod:`diagvi.linked`).

        The model-free view of the cells that the graph gives (a joint PCA of the linked
        features, fitted by :meth:`fit_on_data`); the alignment uses it to decide which
        cells to match.
        """
        return {name: self.linked(side, inputs[name]) for side, name in enumerate(self.node_ranges)}

    @torch.no_grad()
    def fit_on_data(
        self, data: Mapping[str, ModalityData], max_cells: int = 10_000, seed: int = 0
    ) -> None:
        """Fit what is fitted once before training, on up to ``max_cells`` cells per modality:
        :attr:`linked` (the guidance graph's view), the encoders' :attr:`pcs` and the decoders'
        starting bias (``initial_eta`` of each likelihood, at the data's average).

        Read 1,024 cells at a time, keeping only the linked columns of a modality without
        principal components, so that memory stays at ``max_cells x edges`` whatever the number
        of features (or a backed file's size); one ``max_cells x features`` float32 matrix for
        a modality with them (10,000 cells x 2,000 genes: 80 MB).
        """
        rng = np.random.default_rng(seed)
        columns = {}
        for side, name in enumerate(self.node_ranges):
            n = data[name].n_obs
            idx = np.arange(n) if n <= max_cells else np.sort(rng.choice(n, max_cells, False))
            sample = torch.empty(len(idx), data[name].n_vars) if name in self.pcs else None
            linked, sums, counts = [], 0.0, 0.0
            for start in range(0, len(idx), 1024):
                raw = data[name].rows(idx[start : start + 1024])["x"].double()
                total, count = self.likelihood[name].location_sums(raw)
                sums, counts = sums + total, counts + count
                x = self.transform(name, raw.float())
                linked.append(self.linked.columns(side, x))
                if sample is not None:
                    sample[start : start + len(x)] = x
            average = (sums / counts.clamp_min(1.0)).float()
            beta = self.z2x[name].beta
            beta.copy_(self.likelihood[name].initial_eta(average).expand_as(beta))
            columns[side] = torch.cat(linked)
            if sample is not None:
                self.pcs[name].fit(sample, seed=seed, overwrite=True)
        self.linked.fit(columns, seed=seed)

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

    def link_consistency(
        self,
        z: Mapping[str, torch.Tensor],
        inputs: Mapping[str, torch.Tensor],
        v: torch.Tensor,
        moments: Mapping[str, CrossMoments] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``link/<m>``: linked features must co-vary across the cells of each modality.

        For a cross-modal edge ``(i, j)`` with weight ``w`` and sign ``s``, the other
        modality's decoder evaluated at modality ``m``'s cells, ``z v_j``, should correlate
        (with sign ``s``) across those cells with ``m``'s own measured feature ``i`` (its
        encoder input). The term is ``sum_e w_e (1 - corr_e) / sum_e w_e``; correlation is
        invariant to each feature's scale and offset, so it needs no assumption about how
        mRNA and protein levels compare. It is the same evidence that a joint PCA of the
        linked features uses, and it fixes the orientation of the two latent spaces (a
        reflection or a permutation of clusters fits the graph's loss on ``v`` equally well).
        ``moments``: each modality's :func:`cross_moments`, when already computed.
        """
        return _named("link/", self.consistency(z, inputs, v, moments))

    def self_consistency(
        self,
        z: Mapping[str, torch.Tensor],
        inputs: Mapping[str, torch.Tensor],
        v: torch.Tensor,
        moments: Mapping[str, CrossMoments] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``self/<m>``: every feature of modality ``m`` must co-vary with its own decoder.

        The mean over ``m``'s features ``j`` of ``1 - corr(z v_j, x_j)`` across the cells,
        with ``x`` the encoder input. The reconstruction likelihood alone, a small part of the
        loss beside the alignment and the graph, leaves the embeddings of features without a
        cross-modal edge (which :meth:`link_consistency` never sees) close to noise: the
        decoder then imputes them no better than their mean (``experiments/alignment_defaults``,
        sixth round). Like the ``link`` term, it is invariant to each feature's scale.
        ``moments``: each modality's :func:`cross_moments`, when already computed.
        """
        return _named("self/", self.consistency(z, inputs, v, moments))

    def consistency(
        self,
        z: Mapping[str, torch.Tensor],
        inputs: Mapping[str, torch.Tensor],
        v: torch.Tensor,
        moments: Mapping[str, CrossMoments] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Both :meth:`link_consistency` and :meth:`self_consistency` terms, from one
        correlation call per modality. ``moments``: each modality's :func:`cross_moments`,
        when already computed.
        """
        terms = {}
        for name in self.node_ranges:
            if len(inputs[name]) > 1:
                nodes, columns, weights = (
                    getattr(self, f"_consistency_{key}_{name}")
                    for key in ("nodes", "columns", "weights")
                )
                m = moments[name] if moments else cross_moments(z[name], inputs[name])
                link, own = 1.0 - weights @ m.correlations(v[nodes], columns)
                terms[f"link/{name}"], terms[f"self/{name}"] = link, own
        return terms

    def loss_terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Named, unweighted loss terms of one paired minibatch."""
        qv = self.g2v()
        v = qv.rsample()
        terms: dict[str, torch.Tensor] = {}
        zs: dict[str, torch.Tensor] = {}
        inputs: dict[str, torch.Tensor] = {}
        for name in self.names:
            x, b, y = batch[name]["x"], batch[name]["batch"], batch[name]["label"]
            library = x.sum(-1, keepdim=True)  # one pass: the transform and the decoder's
            inputs[name] = self.transform(name, x, library)
            qz = self.x2z[name](self.encoder_input(name, inputs[name]))
            z = qz.rsample()
            px = self.decode(name, z, v, b, library)
            terms[f"nll/{name}"] = -px.log_prob(x).sum(-1).mean()
            terms[f"kl/{name}"] = self.prior.kl(qz, z, y).mean()
            if self.classifier is not None:
                terms[f"cls/{name}"] = self.classifier.loss(z, y)
            zs[name] = qz.loc  # align the posterior means: the embedding users get
        # float32 also under mixed precision (trainer=gpu: bf16-mixed): correlations and
        # Sinkhorn's log-sum-exp iterations lose too much in bfloat16
        with torch.autocast(v.device.type, enabled=False):
            terms.update({f"graph/{k}": t for k, t in self.g2v.loss(qv, v).items()})
            # both terms correlate the same latent with the same inputs: their moments once
            moments = {name: cross_moments(zs[name], inputs[name]) for name in self.names}
            terms.update(self.consistency(zs, inputs, qv.loc, moments))
            terms.update(
                {f"spread/{m}": spread_kl(z) for m, z in zs.items() if len(z) >= SPREAD_MIN_CELLS}
            )
            terms["align"] = self.alignment(zs, self.linked_features(inputs))
        return terms


def _named(prefix: str, terms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The terms whose names start with ``prefix``."""
    return {k: t for k, t in terms.items() if k.startswith(prefix)}


# a variance from fewer cells is too noisy for a logarithm: with two cells its gradient is
# about 1 / (a - b), which now and then dwarfs every other term (the epoch's last minibatch)
SPREAD_MIN_CELLS = 16


def spread_kl(loc: torch.Tensor) -> torch.Tensor:
    """``sum_d KL(N(0, s_d^2) || N(0, 1))`` over the dimensions ``d`` whose spread is below the
    prior's, ``s_d^2`` the variance over the cells of the posterior means' dimension ``d``:
    ``sum_d (v_d - 1 - log v_d) / 2`` with ``v_d = min(s_d^2, 1)``.

    A floor under each latent dimension's spread, one-sided: a dimension spread wider than the
    prior (e.g. by a Gaussian-mixture prior's components) costs nothing. Nothing else in the
    loss holds the latent's scale: the alignment on the raw cost falls as both clouds shrink,
    the per-cell KL pulls the means in, the ``link``/``self`` terms and the classifier do not
    see the scale, and once the decoders read little of the latent (their embeddings shrink
    under the graph loss) the reconstruction does not either. Adam turns such a persistent
    pull, however weak, into a steady drift: without this term the latent shrank about
    fourfold over 400 epochs and the pairing loosened with it
    (``experiments/alignment_defaults``, fifteenth round). The logarithm pushes back the harder
    the smaller a dimension's spread, which at the default weight holds the pairing over long
    runs (sixteenth round). A spread of exactly zero (identical means) gets no gradient.
    """
    variance = loc.float().var(0).clamp(1e-12, 1.0)
    return 0.5 * (variance - 1.0 - variance.log()).sum()


class CrossMoments(NamedTuple):
    """Moments of a latent ``z`` (cells x latent) and data ``x`` (cells x features) over cells.

    ``cross = zc^T xc`` and ``gram = zc^T zc`` with ``zc`` and ``xc`` the centred ``z`` and
    ``x``; ``measured`` the sum of squared deviations of each column of ``x`` (data: no
    gradient).
    """

    cross: torch.Tensor
    gram: torch.Tensor
    measured: torch.Tensor

    def correlations(
        self, v_edges: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Correlation over cells between ``z @ v_edges[e]`` and ``x[:, index[e]]``, per ``e``.

        The covariance is ``v_e . cross[:, index_e]``, the predicted variance
        ``v_e^T gram v_e``; ``index=None``: edge ``e`` is column ``e`` (no gather).
        """
        cross = self.cross if index is None else self.cross[:, index]
        measured = self.measured if index is None else self.measured[index]
        covariance = (v_edges * cross.T).sum(1)
        predicted = ((v_edges @ self.gram) * v_edges).sum(1)
        scale = predicted.clamp_min(1e-12).sqrt() * measured.clamp_min(0.0).sqrt()
        return covariance / scale.clamp_min(1e-8)


def cross_moments(z: torch.Tensor, x: torch.Tensor) -> CrossMoments:
    """The :class:`CrossMoments` of ``z`` and ``x``, without any ``cells x edges`` matrix.

    ``x`` is centred too, although ``zc^T x = zc^T xc`` exactly: in float32 the shortcuts
    ``sum x^2 - n mean^2`` and ``zc^T x`` keep a rounding error of the order of ``mean^2`` and
    ``mean``, which for a feature (nearly) constant in the minibatch, such as a z-scored gene
    that no cell of it detects, was its whole variance: correlations of thousands.
    """
    zc = z - z.mean(0)
    with torch.no_grad():
        xc = x.to(zc.dtype)
        xc = xc - xc.mean(0)
        measured = xc.square().sum(0)
    return CrossMoments(zc.T @ xc, zc.T @ zc, measured)


def edge_correlations(
    z: torch.Tensor, v_edges: torch.Tensor, x: torch.Tensor, index: torch.Tensor | None = None
) -> torch.Tensor:
    """Correlation over cells between ``z @ v_edges[e]`` and ``x[:, index[e]]``, per edge ``e``.

    From moments (:func:`cross_moments`), without forming the ``cells x edges`` matrices: with
    ``zc``, ``xc`` the centred ``z``, ``x``, the covariance is ``v_e . (zc^T xc)[:, index_e]``,
    the predicted variance ``v_e^T (zc^T zc) v_e`` and the measured one the column's ``sum xc^2``.
    ``x`` is data (no gradient). ``index=None``: edge ``e`` is column ``e`` (no gather).
    """
    return cross_moments(z, x).correlations(v_edges, index)
