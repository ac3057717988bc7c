"""The guidance graph's model-free view of the cells: linked features, standardised, projected.

Each cross-modal edge ``e = (i, j)`` with weight ``w`` and sign ``s`` is one column: the first
modality's cells contribute their feature ``i``, the second modality's cells ``s`` times their
feature ``j``; each column is standardised over its modality's cells and scaled by
``sqrt(w)``. Rows of the two modalities are then comparable, and a joint PCA of them is the
naive baseline of the benchmark. :class:`LinkedView` keeps the top components of that PCA,
fitted once on the training data, so that a minibatch of either modality maps to the same few
shared coordinates at the cost of one small matrix product.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from diagvi.nn import principal_axes


def linked_pairs(graph) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-modal edges of ``graph`` as feature indices within each modality.

    Returns ``(index_a, index_b, scale)``: edge ``e`` links feature ``index_a[e]`` of the first
    modality to feature ``index_b[e]`` of the second; ``scale[0]`` is ``sqrt(weight)`` and
    ``scale[1]`` is ``sign * sqrt(weight)`` per edge (each undirected edge once).
    """
    (a0, a1), (b0, b1) = list(graph.node_ranges.values())
    row, col = graph.edge_index
    keep = (row >= a0) & (row < a1) & (col >= b0) & (col < b1)
    weight = graph.edge_weight[keep].float().sqrt()
    sign = graph.edge_sign[keep].float()
    return row[keep] - a0, col[keep] - b0, torch.stack([weight, sign * weight])


class LinkedView(nn.Module):
    """Joint-PCA coordinates of the linked features, shared by both modalities.

    Parameters
    ----------
    graph
        Guidance graph with two modalities (``node_ranges``).
    n_components
        Most components kept (fewer when there are fewer edges or cells).

    Notes
    -----
    Call :meth:`fit` once on (a sample of) each modality's linked columns; the statistics are
    buffers, so they are saved and loaded with the model. Before :meth:`fit`, each column is
    standardised within the minibatch and the projection is the identity on the columns.
    """

    def __init__(self, graph, n_components: int = 32) -> None:
        super().__init__()
        index_a, index_b, scale = linked_pairs(graph)
        n_edges = len(index_a)
        k = min(n_components, n_edges)
        self.register_buffer("index_a", index_a, persistent=False)
        self.register_buffer("index_b", index_b, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("loadings", torch.eye(n_edges, k))
        self.register_buffer("variance", torch.ones(k))  # of each component (fitted)
        # the fitted map as one affine map per modality on its whole input (the gather of the
        # linked columns, standardisation, signs and weights folded in): x @ projection + offset
        (a0, a1), (b0, b1) = list(graph.node_ranges.values())
        self.register_buffer("projection_a", torch.zeros(a1 - a0, k))
        self.register_buffer("projection_b", torch.zeros(b1 - b0, k))
        self.register_buffer("offset", torch.zeros(2, k))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def n_edges(self) -> int:
        return self.loadings.shape[0]

    @property
    def n_components(self) -> int:
        return self.loadings.shape[1]

    @property
    def weight(self) -> torch.Tensor:
        """Edge weights ``w_e``."""
        return self.scale[0].square()

    @property
    def sign(self) -> torch.Tensor:
        """Edge signs ``s_e``."""
        return self.scale[1] / self.scale[0]

    def columns(self, side: int, x: torch.Tensor) -> torch.Tensor:
        """Modality ``side``'s end of every edge, one column per edge (not standardised)."""
        return x[:, self.index_b if side else self.index_a]

    def forward(self, side: int, x: torch.Tensor) -> torch.Tensor:
        """Shared coordinates ``(n_cells, n_components)`` of modality ``side``'s inputs ``x``.

        Before :meth:`fit`, the linked columns are standardised within the minibatch.
        """
        if bool(self.fitted):
            projection = self.projection_b if side else self.projection_a
            return torch.addmm(self.offset[side], x.to(projection.dtype), projection)
        # in the buffers' dtype, as the fitted map: float64 inputs met float32 loadings
        columns = self.columns(side, x).to(self.loadings.dtype)
        if len(columns) < 2:
            return columns.new_zeros(len(columns), self.n_components)
        columns = (columns - columns.mean(0)) / columns.std(0).clamp_min(1e-6)
        return (columns * self.scale[side]) @ self.loadings

    @torch.no_grad()
    def fit(self, columns: Mapping[int, torch.Tensor], seed: int = 0) -> LinkedView:
        """Fit the standardisation and the joint PCA on each side's :meth:`columns` of its inputs.

        Both modalities weigh equally in the PCA whatever their numbers of cells, so that the
        shared directions are not those of the larger one alone.
        """
        rows, scales = [], []
        for side in (0, 1):
            cols = columns[side].float()
            mean = cols.mean(0)
            std = cols.std(0).nan_to_num(1.0).clamp_min(1e-6)
            # a column constant in these cells (a feature the sample never detected) says
            # nothing about them; dividing by its clamped spread would send any cell that
            # differs to ~1e6 in the folded projection, so it contributes nothing instead
            constant = (cols.amax(0) == cols.amin(0)) & (len(cols) > 1)
            scales.append((mean, torch.where(constant, 0.0, self.scale[side] / std)))
            rows.append((cols - mean) * scales[side][1] / len(cols) ** 0.5)
        stacked = torch.cat(rows)
        basis, singular = principal_axes(stacked, self.n_components, seed)
        # rows were divided by sqrt(n) per side: squared singular values are the variance of
        # each component averaged over the two modalities
        self.variance.zero_()
        self.variance[: len(singular)] = singular.square() / 2
        self.loadings.zero_()
        self.loadings[:, : basis.shape[1]] = basis
        for side, projection in enumerate((self.projection_a, self.projection_b)):
            mean, factor = scales[side]
            weighted = self.loadings * factor[:, None]
            projection.zero_().index_add_(0, self.index_b if side else self.index_a, weighted)
            self.offset[side] = -(mean @ weighted)
        self.fitted.fill_(True)
        return self
