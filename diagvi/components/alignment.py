"""Alignment losses between the two modalities' latent minibatches.

The default is the de-biased unbalanced Sinkhorn divergence of GeomLoss
(Feydy et al. 2019; Séjourné et al. 2019) with an entropic regularisation ``epsilon`` chosen
from each minibatch's cost matrix, as OTT-JAX does (``epsilon = scale * stat(C)``), so that the
transport plan stays equally sharp whatever the scale of the latent space. It is computed by
:func:`diagvi.components.sinkhorn.sinkhorn_divergence` (GeomLoss' algorithm, faster on a CPU;
with ``schedule="geomloss"`` the same values and gradients) or, with ``solver="geomloss"``, by
GeomLoss' ``SamplesLoss``.
"""

from __future__ import annotations

import math

import torch
from geomloss import SamplesLoss
from torch import nn

from diagvi.components.sinkhorn import SCHEDULES, ground_cost, sinkhorn_divergence
from diagvi.registry import ALIGNMENTS

EPSILON_RULES = ("mean", "std")
SOLVERS = ("dense", "geomloss")


def mean_cost(x: torch.Tensor, y: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Mean of the ground cost (:func:`~diagvi.components.sinkhorn.ground_cost`); for ``p = 2``
    in closed form, without the ``N x M`` matrix:
    ``mean_ij |x_i - y_j|^2 / 2 = (var(x) + var(y) + |mean(x) - mean(y)|^2) / 2`` with
    ``var(x) = mean_i |x_i - mean(x)|^2``, the sum of the coordinates' variances. Each term
    is non-negative: the expansion ``mean|x|^2 + mean|y|^2 - 2 mean(x).mean(y)`` loses the
    cost to float32 rounding once the clouds sit far from the origin compared with their
    spread."""
    if p != 2:
        return ground_cost(x, y, p).mean()
    x_var, x_mean = torch.var_mean(x, 0, correction=0)
    y_var, y_mean = torch.var_mean(y, 0, correction=0)
    return (x_var + y_var + (x_mean - y_mean).square()).sum() / 2


def adaptive_blur(
    x: torch.Tensor,
    y: torch.Tensor,
    p: int = 2,
    rule: str = "mean",
    scale: float = 0.05,
    cost: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
) -> float:
    """Blur from the minibatch's cost: ``epsilon = scale * rule(C)``, ``blur = epsilon^(1/p)``.

    ``rule="std"`` with ``scale=0.05`` is OTT-JAX's default (``epsilon = 0.05 * std(C)``);
    ``rule="mean"`` with ``scale=0.05`` is scvi-tools' DIAGVI rule. GeomLoss' ``blur`` is the
    length scale whose ``p``-th power is the entropic ``epsilon``. The rule is not
    differentiated: it sets the solver's resolution, not the objective. ``cost``: the cost
    matrix, ``mean``: its mean, when already known.
    """
    if rule not in EPSILON_RULES:
        raise ValueError(f"unknown epsilon rule {rule!r}; expected one of {EPSILON_RULES}")
    with torch.no_grad():
        if mean is not None and rule == "mean":
            stat = mean.detach()
        elif cost is None and rule == "mean":
            stat = mean_cost(x.detach(), y.detach(), p)  # closed form for p = 2: no N x M matrix
        else:
            cost = ground_cost(x.detach(), y.detach(), p) if cost is None else cost.detach()
            # the spread of a single cost (one cell in each modality) is 0, not torch's NaN
            spread = cost.std() if cost.numel() > 1 else cost.new_zeros(())
            stat = cost.mean() if rule == "mean" else spread
        epsilon = (scale * stat).clamp_min(1e-8)
    return float(epsilon) ** (1.0 / p)


def _centred(
    x: torch.Tensor, y: torch.Tensor, detach: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and ``y`` less the midpoint of their means.

    The costs depend on differences only, so the value is unchanged; the solvers' expansion
    ``|x|^2 / 2 + |y|^2 / 2 - x.y`` then keeps its float32 accuracy when the clouds sit far
    from the origin compared with their spread (a collapsing latent). With ``detach`` the
    centre is a constant and the gradients are unchanged too. Differentiated
    (``detach=False``), the gradients sum to zero over all points, as those of any function
    of the differences; the mean-cost scale needs it, since its gradient otherwise depends on
    where the origin is.
    """
    centre = (x.mean(0) + y.mean(0)) / 2
    centre = centre.detach() if detach else centre
    return x - centre, y - centre


@ALIGNMENTS.register("uot")
class UnbalancedSinkhorn(nn.Module):
    """De-biased unbalanced Sinkhorn divergence between the two latent clouds.

    Parameters
    ----------
    p
        Exponent of the ground cost (1 or 2).
    blur_mode
        ``"adaptive"`` (from each minibatch, see :func:`adaptive_blur`), ``"fixed"`` (``blur``),
        or ``"annealed"`` (geometric decay from ``blur_start`` to ``blur`` over ``anneal_steps``
        training steps).
    epsilon_rule, epsilon_scale
        The adaptive rule (``"mean"`` or ``"std"`` of the cost matrix) and its factor.
    blur, blur_start, anneal_steps
        Fixed blur, or the end and start of the annealed schedule.
    reach_scale
        ``reach = reach_scale * blur``: how far mass may travel before it is cheaper to destroy
        it. Smaller values tolerate larger composition differences; ``None`` is balanced OT.
    scaling
        GeomLoss epsilon-scaling ratio (closer to 1: more accurate, slower).
    schedule
        The dense solver's epsilon-scaling: ``"short"`` (the debiasing problems on the last
        three temperatures only: 24 passes instead of 32 at seven, values and gradients
        within about ``2e-4`` on the benchmark) or ``"geomloss"`` (GeomLoss' own, which
        ``solver="geomloss"`` always runs); see
        :func:`~diagvi.components.sinkhorn.sinkhorn_divergence`.
    feature_weight
        Share ``w`` of the transport cost given to the guidance graph's linked features (see
        :meth:`diagvi.module.DiagVAE.linked_features`): ``C = C_z + w / (1 - w) * mean(C_z)
        * C_f / mean(C_f)``, the factor held constant in the gradient (for ``p = 2``; with
        ``p = 1`` the features are scaled alike and the cost is the distance between the
        concatenated points, not a sum of the two costs). The linked features
        are data, not parameters: they only steer which cells are matched, and the gradient
        still moves the latent clouds. They break the symmetries (reflections, permuted
        clusters) that the latent cost alone cannot tell apart. ``0`` transports on the
        latent alone (scvi-tools' DIAGVI).
    scale_cost
        ``"mean"``: divide the cost by its minibatch mean before transport,
        as OTT-JAX's ``scale_cost="mean"``. The divergence is then invariant to the scale of
        the latent space, so the encoders cannot lower it by shrinking both clouds towards a
        point (which the reconstruction then undoes through the decoder's scale ``alpha``).
        ``None`` keeps the raw cost.
    solver
        ``"dense"``: :func:`diagvi.components.sinkhorn.sinkhorn_divergence`, GeomLoss'
        algorithm with a fraction of its per-call overhead (the same values and gradients
        with ``schedule="geomloss"``);
        ``"geomloss"``: GeomLoss' ``SamplesLoss`` itself (tensorized backend).
    """

    def __init__(
        self,
        p: int = 2,
        blur_mode: str = "adaptive",
        epsilon_rule: str = "mean",
        epsilon_scale: float = 0.02,
        blur: float = 0.05,
        blur_start: float = 1.0,
        anneal_steps: int = 1000,
        reach_scale: float | None = 10.0,
        scaling: float = 0.5,
        scale_cost: str | None = None,
        feature_weight: float = 0.5,
        solver: str = "dense",
        schedule: str = "short",
    ) -> None:
        super().__init__()
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.solver, self.schedule = solver, schedule
        if blur_mode not in ("adaptive", "fixed", "annealed"):
            raise ValueError(f"blur_mode must be adaptive, fixed or annealed, got {blur_mode!r}")
        if epsilon_rule not in EPSILON_RULES:
            raise ValueError(f"epsilon_rule must be one of {EPSILON_RULES}, got {epsilon_rule!r}")
        self.p, self.blur_mode, self.scaling = p, blur_mode, scaling
        self.epsilon_rule, self.epsilon_scale = epsilon_rule, epsilon_scale
        self.blur, self.blur_start, self.anneal_steps = blur, blur_start, anneal_steps
        if scale_cost not in (None, "mean"):
            raise ValueError(f"scale_cost must be 'mean' or None, got {scale_cost!r}")
        self.reach_scale, self.scale_cost = reach_scale, scale_cost
        if not 0.0 <= feature_weight < 1.0:
            raise ValueError(f"feature_weight must be in [0, 1), got {feature_weight}")
        self.feature_weight = feature_weight
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def _with_features(self, x, y, fx, fy) -> tuple[torch.Tensor, ...]:
        """The latent clouds and the linked features, scaled to their share of the cost.

        The latent part keeps its own cost (raw, or divided by its differentiated mean with
        ``scale_cost="mean"``); the feature part is rescaled, without gradient, so that its
        mean is ``feature_weight / (1 - feature_weight)`` times the latent part's. A latent
        that shrinks therefore shrinks the feature part with it, and gains nothing. Returns
        ``(x, y, fx, fy, mean)``: the cost is that of the concatenations ``[x, fx]`` and
        ``[y, fy]``; for ``p = 2`` it is the sum of the two parts' costs, and ``mean`` its mean
        (without gradient; ``None`` for ``p = 1``).
        """
        root = 1.0 / self.p
        fx, fy = _centred(fx, fy)
        latent = mean_cost(x, y, self.p)
        latent_cost = latent.clamp_min(1e-12)
        if self.scale_cost == "mean":
            x, y = x / latent_cost**root, y / latent_cost**root
            latent = latent / latent_cost
            latent_cost = torch.ones_like(latent_cost)
        share = self.feature_weight / (1.0 - self.feature_weight)
        feature_cost = mean_cost(fx, fy, self.p)
        feature = share * latent_cost.detach() / feature_cost.clamp_min(1e-12)
        mean = latent.detach() + feature * feature_cost if self.p == 2 else None
        return x, y, fx * feature**root, fy * feature**root, mean

    def current_blur(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        cost: torch.Tensor | None = None,
        mean: torch.Tensor | None = None,
    ) -> float:
        if self.blur_mode == "adaptive":
            return adaptive_blur(x, y, self.p, self.epsilon_rule, self.epsilon_scale, cost, mean)
        if self.blur_mode == "fixed":
            return self.blur
        progress = min(int(self.step) / max(self.anneal_steps, 1), 1.0)
        return self.blur_start * (self.blur / self.blur_start) ** progress

    def forward(
        self, z: dict[str, torch.Tensor], features: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        # the costs depend on differences: centred clouds keep their float32 accuracy
        x, y = _centred(*z.values(), detach=self.scale_cost is None)
        cost = fixed = whole = mean = None
        if self.feature_weight > 0 and features:
            x, y, fx, fy, mean = self._with_features(x, y, *(features[k] for k in z))
            if self.solver == "dense" and self.p == 2:
                fixed = fx, fy  # the dense solver then differentiates the latent part alone
                if self.epsilon_rule != "mean":  # the spread of the cost needs the clouds
                    whole = torch.cat([x, fx], 1), torch.cat([y, fy], 1)
            else:  # the features are coordinates like any other (their gradient goes nowhere)
                x, y = torch.cat([x, fx], 1), torch.cat([y, fy], 1)
        elif self.scale_cost == "mean":
            # differentiated on purpose: a detached scale would leave a gradient that shrinks
            # both clouds every step, and the latent space collapses towards a point
            cost = ground_cost(x, y, self.p)
            mean_cost = cost.mean().clamp_min(1e-12)
            x, y = x / mean_cost ** (1.0 / self.p), y / mean_cost ** (1.0 / self.p)
            cost = cost / mean_cost  # the rescaled clouds' cost, reused by the blur rule
        blur = self.current_blur(*(whole or (x, y)), cost, mean)
        reach = None if self.reach_scale is None else self.reach_scale * blur
        if self.training:
            self.step += 1
        # an adaptive blur, a function of the clouds, is already NaN or infinite for them
        finite = math.isfinite(blur) and (
            self.blur_mode == "adaptive" or bool(torch.isfinite(x.sum() + y.sum()))
        )
        if not finite:
            # a NaN or infinite latent: a NaN term that the training loop names or skips
            # (the epsilon-scaling schedule cannot be built from it)
            return (x.sum() + y.sum()) * math.nan
        # epsilon-scaling starts from the largest distance between the two clouds, not GeomLoss'
        # default (the bounding box's diagonal, several times larger in tens of dimensions)
        if self.solver == "dense":
            x_fixed, y_fixed = fixed or (None, None)
            return sinkhorn_divergence(
                x,
                y,
                self.p,
                blur,
                reach,
                diameter="max_cost",
                scaling=self.scaling,
                x_fixed=x_fixed,
                y_fixed=y_fixed,
                schedule=self.schedule,
            )
        with torch.no_grad():
            cost = ground_cost(x.detach(), y.detach(), self.p) if cost is None else cost.detach()
        diameter = max(float((self.p * cost.max()) ** (1.0 / self.p)), blur)
        settings = {"p": self.p, "blur": blur, "reach": reach, "diameter": diameter}
        loss = SamplesLoss(
            "sinkhorn", debias=True, scaling=self.scaling, backend="tensorized", **settings
        )
        return loss(x, y)


@ALIGNMENTS.register("sinkhorn")
class BalancedSinkhorn(UnbalancedSinkhorn):
    """De-biased balanced Sinkhorn divergence (every cell must be matched)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**{**kwargs, "reach_scale": None})


@ALIGNMENTS.register("none")
class NoAlignment(nn.Module):
    """No alignment term: the modalities meet only through the guidance graph."""

    def forward(
        self, z: dict[str, torch.Tensor], features: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        return sum(v.sum() for v in z.values()) * 0.0
