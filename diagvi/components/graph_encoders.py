"""Graph encoders (g2v): variational feature embeddings ``v`` from the guidance graph."""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal
from torch_geometric.data import Data
from torch_geometric.nn import GCNConv
from torch_geometric.utils import scatter

from diagvi.components.priors import kl_standard_normal
from diagvi.registry import GRAPH_ENCODERS


def signed_gcn_norm(
    edge_index: torch.Tensor, weight: torch.Tensor, sign: torch.Tensor, n: int
) -> torch.Tensor:
    """Symmetric GCN normalisation that keeps edge signs.

    ``a_ij = s_ij * w_ij / sqrt(d_i * d_j)`` with degree ``d_i = sum_j w_ij`` (weights are
    positive, so the degree is too; the sign only flips the message). Kipf & Welling (2017).
    A node whose edges all have weight 0 (or that has only incoming edges) has degree 0; its
    edges get 0, as in PyG's ``gcn_norm``, rather than ``0 * inf = nan``.
    """
    degree = scatter(weight, edge_index[0], dim=0, dim_size=n, reduce="sum")
    inv_sqrt = degree.rsqrt().masked_fill(degree == 0, 0.0)
    return sign * weight * inv_sqrt[edge_index[0]] * inv_sqrt[edge_index[1]]


def graph_loss(
    v: torch.Tensor,
    edge_index: torch.Tensor,
    weight: torch.Tensor,
    sign: torch.Tensor,
    n_negative: int = 10,
    generator: torch.Generator | None = None,
    n_partners: int = 32,
) -> torch.Tensor:
    """Weighted edge-reconstruction loss with negative sampling.

    Each edge ``(i, j)`` contributes ``w_ij * BCE(sigmoid(v_i . v_j), [s_ij > 0])``: a positive
    edge pulls the embeddings together, a negative (``s = -1``) pushes them apart. Each edge also
    has ``n_negative`` random partners ``j'`` with target 0 and the same weight. The result is
    the per-edge negative log-likelihood ``sum_e w_e (BCE_e + sum_k BCE_ek) / sum_e w_e``, the
    Bernoulli edge model's NLL per observed edge (GLUE, Cao & Gao 2022).

    The partners are ``n_partners`` nodes drawn uniformly once per call and shared by all
    edges; an edge's negative term is ``n_negative`` times its mean BCE against them, which
    has the same expectation as ``n_negative`` partners of its own. Grouped by source node,
    ``sum_e w_e mean_k BCE(v_i(e) . v_k, 0) = sum_i W_i mean_k BCE(v_i . v_k, 0)`` with ``W_i``
    the summed weight of the edges leaving ``i``: one ``nodes x n_partners`` product instead
    of a gather and a scatter of ``n_negative x edges`` embedding pairs.
    """
    src, dst = edge_index
    logits = (v[src] * v[dst]).sum(-1)
    bce = F.binary_cross_entropy_with_logits(logits, (sign > 0).to(v.dtype), reduction="none")
    total = (weight * bce).sum()
    if n_negative > 0:
        partners = torch.randint(0, v.shape[0], (n_partners,), device=v.device, generator=generator)
        out_weight = scatter(weight, src, dim=0, dim_size=v.shape[0], reduce="sum")
        # BCE against target 0 is softplus(logit); logits below -80 add < 1e-34 and would take
        # exp's slow path for results that underflow (several times slower per element)
        negative = F.softplus((v @ v[partners].T).clamp_min(-80.0)).mean(1)
        # one dtype for the product: the weights' (a float64 buffer after .double()) and the
        # embeddings' (float32 from the encoder) may differ, and matmul does not promote
        dtype = torch.promote_types(out_weight.dtype, negative.dtype)
        total = total + n_negative * (out_weight.to(dtype) @ negative.to(dtype))
    return total / weight.sum()


@GRAPH_ENCODERS.register("gcn")
class GCNGraphEncoder(nn.Module):
    """One weighted, signed GCN layer over learnable node features, then a Gaussian head.

    ``q(v) = N(loc(h), softplus(scale(h)))`` with ``h = GCN(E)``; the guidance-graph loss is the
    per-edge ELBO: :func:`graph_loss` plus ``KL(q(v) || N(0, I))`` summed over nodes and divided,
    as :func:`graph_loss` is, by the summed edge weight (the number of edges when all are 1).

    Parameters
    ----------
    graph
        Guidance graph (``edge_index``, ``edge_weight``, ``edge_sign``, ``num_nodes``).
    n_latent
        Embedding dimension (equal to the cell latent dimension).
    n_negative
        Negative samples per edge.
    init_scale
        Standard deviation of the learnable node features at initialisation. Small, so that
        each feature's embedding is soon what the data make it: Adam moves a parameter by
        about the learning rate per step, and from unit-scale random features the embeddings
        of features without a cross-modal edge were still mostly their random start after
        100 epochs (their decoders then imputed almost nothing;
        ``experiments/alignment_defaults``, sixteenth round).
    """

    def __init__(
        self, graph: Data, n_latent: int, n_negative: int = 10, init_scale: float = 0.01
    ) -> None:
        super().__init__()
        valid = isinstance(init_scale, Real) and not isinstance(init_scale, bool)
        if not (valid and math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive finite number, got {init_scale!r}")
        n = int(graph.num_nodes)
        self.n_negative = n_negative
        self.register_buffer("edge_index", graph.edge_index.long())
        self.register_buffer("edge_weight", graph.edge_weight.float())
        self.register_buffer("edge_sign", graph.edge_sign.float())
        self.register_buffer(
            "norm_weight", signed_gcn_norm(self.edge_index, self.edge_weight, self.edge_sign, n)
        )
        # No bias before the mean: a bias shared by every node would make all embeddings
        # collinear at the start, and the decoders would then read one direction of z only.
        self.embedding = nn.Parameter(torch.randn(n, n_latent) * init_scale)
        self.conv = GCNConv(n_latent, n_latent, normalize=False, add_self_loops=False, bias=False)
        self.loc = nn.Linear(n_latent, n_latent, bias=False)
        self.scale = nn.Linear(n_latent, n_latent)

    def forward(self) -> Normal:
        h = self.conv(self.embedding, self.edge_index, self.norm_weight)
        scale = F.softplus(self.scale(h).float()) + 1e-4  # positive: no argument checks
        return Normal(self.loc(h).float(), scale, validate_args=False)

    def loss(self, qv: Normal, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-edge graph ELBO for one sample ``v`` of ``qv``: ``{"nll": ..., "kl": ...}``."""
        nll = graph_loss(v, self.edge_index, self.edge_weight, self.edge_sign, self.n_negative)
        kl = kl_standard_normal(qv).sum()
        return {"nll": nll, "kl": kl / self.edge_weight.sum()}
