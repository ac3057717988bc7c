"""De-biased (unbalanced) Sinkhorn divergence between two point clouds, dense, on torch.

The algorithm of GeomLoss' ``SamplesLoss("sinkhorn", backend="tensorized")`` (Feydy et al.
2019; Séjourné et al. 2019; J. Feydy's thesis, Alg. 3.5): symmetric Sinkhorn updates with
averaging, epsilon-scaling from ``diameter^p`` down to ``blur^p`` by ``scaling^p`` per
iteration, the three problems ``(a, b)``, ``(a, a)`` and ``(b, b)`` solved together (or the
last two on the last temperatures only: ``schedule="short"``), and one last extrapolation step
that alone carries gradients (the envelope theorem gives the exact gradient of the divergence
from the converged potentials). ``tests/test_sinkhorn.py`` checks values and gradients against
GeomLoss (``schedule="geomloss"``) and the shorter schedule of the de-biasing problems against
both GeomLoss' and the converged divergence.

Why our own: nearly all of the time goes to the exponentials of the log-sum-exps. On a CPU
``exp`` of arguments below about -87 (results that underflow float32) takes a slow path, 7-20
times slower per element, and most entries of ``h - C / epsilon`` are far below that once
epsilon is small: the shifted arguments are floored at ``-80`` first (``exp(-80) < 1e-34``
relative to the largest term: the same value in float32 and float64 alike). And the
log-sum-exps are taken in base 2, ``log2 sum 2^(a log2 e)``: torch's ``exp2`` is three to four
times faster than its ``exp`` on a CPU (a ``(4, 256, 256)`` stack: 73 against 300 us), for
the same kernel up to rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_LOG2E = 1.0 / math.log(2.0)
_EXP2_FLOOR = -80.0 * _LOG2E  # 2^floor = exp(-80)


def logsumexp(a: torch.Tensor, dim: int) -> torch.Tensor:
    """``log sum exp`` over ``dim``, terms below ``exp(-80)`` times the largest set to that."""
    a = a * _LOG2E
    top = a.amax(dim, keepdim=True).detach()
    total = (a - top).clamp_min(_EXP2_FLOOR).exp2().sum(dim).log2() + top.squeeze(dim)
    return total / _LOG2E


def ground_cost(
    x: torch.Tensor, y: torch.Tensor, p: int = 2, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``C_ij = |x_i - y_j|^2 / 2`` (``p = 2``) or ``|x_i - y_j|`` (``p = 1``), as GeomLoss.

    ``x`` and ``y`` are ``(N, D)`` and ``(M, D)``, or stacks ``(K, N, D)`` and ``(K, M, D)``;
    ``out``, when given, receives the result (no gradient through it).
    """
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    # |x - y|^2 / 2 = |x|^2 / 2 + |y|^2 / 2 - x.y: one pass to broadcast the norms, and the
    # product added in place (the textbook expression makes five passes over N x M)
    norms = (x.square().sum(-1) / 2)[..., :, None], (y.square().sum(-1) / 2)[..., None, :]
    half = torch.add(*norms, out=out)
    half = half.baddbmm_(x, y.mT, alpha=-1.0) if x.dim() == 3 else half.addmm_(x, y.mT, alpha=-1.0)
    return half if p == 2 else half.mul_(2.0).clamp_min_(1e-8).sqrt_()


class _Workspace:
    """Two ``(K, N, M)`` scratch arrays kept from one call to the next, per dtype, on a CPU.

    On a CPU a fresh 1 MB array (a 256-cell minibatch's stack) is new memory from the system,
    and its first pass pays a page fault per 4 KB: about 1 ms, ten times the pass itself, for
    each of the cost stack, the iterations' arguments and the extrapolation's kernel.
    Accelerators get fresh arrays (their caching allocators already reuse memory). Nothing
    returned aliases them: each call's results are new tensors.
    """

    def __init__(self) -> None:
        self.arrays: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, shape: tuple[int, ...], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if like.device.type != "cpu":
            return like.new_empty(shape), like.new_empty(shape)
        size = math.prod(shape)
        arrays = self.arrays.get(like.dtype)
        if arrays is None or arrays[0].numel() < size:
            arrays = tuple(like.new_empty(size) for _ in range(2))
            self.arrays[like.dtype] = arrays
        return tuple(a[:size].view(shape) for a in arrays)


_WORKSPACE = _Workspace()

SCHEDULES = ("short", "geomloss")
# temperatures at the end of the short schedule on which the debiasing problems are solved
_SYMMETRIC_TEMPERATURES = 3


def epsilon_schedule(p: int, diameter: float, blur: float, scaling: float) -> list[float]:
    """Temperatures from ``diameter^p`` to ``blur^p``, divided by ``scaling^p`` each step."""
    steps = np.arange(p * math.log(diameter), p * math.log(blur), p * math.log(scaling))
    return [diameter**p, *np.exp(steps).tolist(), blur**p]


def _padded(clouds: list[torch.Tensor], size: int, fill: float = 0.0) -> torch.Tensor:
    """Stack 1-d or 2-d tensors along a new first axis, their first axis padded to ``size``."""
    if all(len(c) == size for c in clouds):
        return torch.stack(clouds)
    return torch.stack(
        [
            torch.nn.functional.pad(c, (0, 0) * (c.dim() - 1) + (0, size - len(c)), value=fill)
            for c in clouds
        ]
    )


class _SquaredCostLogSumExp(torch.autograd.Function):
    """``log sum_j exp(h_j - C_ij / eps)`` over a stack of costs ``C_ij = |x_i - y_j|^2 / 2``.

    ``x`` and ``y`` are stacks ``(K, N, D)`` and ``(K, M, D)``; ``cost`` is their ``(K, N, M)``
    ground cost, already computed (without gradient) for the Sinkhorn iterations; ``scratch``
    a ``(K, N, M)`` array it may overwrite. Differentiated
    in ``x`` only (``y`` and ``h`` are detached where it is used), by its closed form: the
    gradient in ``x_i`` is ``(barycentre_i - x_i) / eps`` with ``barycentre_i = sum_j P_ij y_j``
    and ``P`` the row-normalised kernel, one matmul in the forward. Autograd through the
    ``N x M`` log-sum-exp and the cost would take several more passes over it.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        y: torch.Tensor,
        cost: torch.Tensor,
        h: torch.Tensor,
        eps: float,
        scratch: torch.Tensor,
    ):
        # in base 2, as the iterations: log sum_j 2^((h_j - C_ij / eps) log2 e), / log2 e
        scores = torch.add(h[:, None, :] * _LOG2E, cost, alpha=-_LOG2E / eps, out=scratch)
        top = scores.amax(2, keepdim=True)
        kernel = scores.sub_(top).clamp_min_(_EXP2_FLOOR).exp2_()  # in place
        total = kernel.sum(2)
        ctx.save_for_backward(x, torch.bmm(kernel, y).div_(total[..., None]))
        ctx.eps = eps
        return total.log2_().add_(top.squeeze(2)).div_(_LOG2E)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, barycentre = ctx.saved_tensors
        return grad[..., None] * (barycentre - x) / ctx.eps, None, None, None, None, None


def sinkhorn_divergence(
    x: torch.Tensor,
    y: torch.Tensor,
    p: int = 2,
    blur: float = 0.05,
    reach: float | None = None,
    diameter: float | str | None = None,
    scaling: float = 0.5,
    x_fixed: torch.Tensor | None = None,
    y_fixed: torch.Tensor | None = None,
    schedule: str = "geomloss",
) -> torch.Tensor:
    """De-biased Sinkhorn divergence ``S(a, b)`` between uniform measures on ``x`` and ``y``.

    ``S = OT(a, b) - OT(a, a) / 2 - OT(b, b) / 2`` with entropic regularisation
    ``epsilon = blur^p``; with ``reach``, the marginal constraints are relaxed by a KL penalty of
    strength ``rho = reach^p`` (unbalanced OT). Same arguments and value as GeomLoss'
    ``SamplesLoss("sinkhorn", p, blur, reach, diameter, scaling, debias=True)`` (with
    ``schedule="geomloss"``, the default here);
    ``diameter="max_cost"`` starts the epsilon-scaling from the largest distance between the two
    clouds, ``(p max_ij C_ij)^(1/p)`` (at least ``blur``), read from the cost matrix the solver
    computes anyway (GeomLoss' default, the diagonal of the bounding box, is several times larger
    in tens of dimensions and costs as many extra iterations).

    ``x_fixed`` and ``y_fixed`` (given together) are further coordinates of the same points,
    not differentiated (data): the value is that of the clouds ``[x, x_fixed]`` and
    ``[y, y_fixed]``, the gradients those in ``x`` and ``y``. With ``p = 2`` the last
    extrapolation then works on ``x`` and ``y`` alone: with the guidance graph's linked
    features as fixed coordinates (134 beside a 20-dimensional latent on the benchmark's
    MERFISH) its gradient costs a seventh of what the concatenated clouds would.

    ``schedule="geomloss"`` runs GeomLoss' epsilon-scaling: every problem at every temperature.
    ``"short"`` solves the two symmetric (debiasing) problems ``(a, a)`` and ``(b, b)`` on the
    last three temperatures only, from a first soft-min there: the symmetric updates with
    averaging converge in a few steps. With ``reach``, the cross problems take their first
    soft-min alone at the first temperature (``diameter^p``: a nearly flat kernel, and a
    soft-min damped by ``1 / (1 + eps / rho)``), without the averaged update. Of ``L``
    temperatures, ``2 L + 8`` updates of one problem (``2 (L + 1) + 8`` balanced) instead of
    ``4 (L + 1)`` (none fewer up to three, 22 instead of 32 at seven); on the benchmark's latent
    minibatches the value and gradients move by ``1e-6``-``2e-4`` (relative), where GeomLoss'
    epsilon-scaling itself is some ``1e-3``-``3e-2`` (value) and ``0.2``-``0.4`` (gradients)
    from the converged divergence (``experiments/benchmark``, tenth and twelfth rounds).
    """
    if (x_fixed is None) != (y_fixed is None):
        raise ValueError("x_fixed and y_fixed must be given together")
    if x_fixed is not None and p != 2:  # the cost is not a sum over coordinates
        x, y = torch.cat([x, x_fixed.detach()], 1), torch.cat([y, y_fixed.detach()], 1)
        x_fixed = y_fixed = None
    with_fixed = (
        (torch.cat([x, x_fixed], 1).detach(), torch.cat([y, y_fixed], 1).detach())
        if x_fixed is not None
        else (x.detach(), y.detach())
    )
    # the cost is that of the concatenations, in their dtype (float64 features widen float32)
    x, y = x.to(with_fixed[0].dtype), y.to(with_fixed[1].dtype)
    from_cost = isinstance(diameter, str)
    if from_cost and diameter != "max_cost":
        raise ValueError(f"diameter must be a number, None or 'max_cost', got {diameter!r}")
    if diameter is None:
        with torch.no_grad():
            both = torch.cat(with_fixed)
            diameter = float((both.max(0).values - both.min(0).values).norm())
    rho = None if reach is None else reach**p
    n, m = len(x), len(y)
    a_log = torch.full((n,), -math.log(n), dtype=x.dtype, device=x.device)
    b_log = torch.full((m,), -math.log(m), dtype=y.dtype, device=y.device)

    def damping(eps: float) -> float:
        return 1.0 if rho is None else 1.0 / (1.0 + eps / rho)

    # The four potentials f_aa (on x), g_bb (on y), f_ba (on x), g_ab (on y) are solved as one
    # stack: each is the soft-min over its cost matrix's columns of (log weight + partner
    # potential / eps - cost / eps). One kernel per operation for all four instead of four
    # (256-cell minibatches: forward 5.2 -> 4.1 ms). Clouds of unequal size are padded;
    # padded columns weigh exp(-inf) = 0 and padded rows are never read. The symmetric
    # (debiasing) problems come first, so that the cross problems alone are a contiguous slice.
    size = max(n, m)
    partner = torch.tensor([0, 1, 3, 2], device=x.device)
    log_weights = _padded([a_log, b_log, b_log, a_log], size, fill=-math.inf)
    sources, targets = [x, y, x, y], [x, y, y, x]
    # padded once: the sources keep their gradient for the last extrapolation below
    source_stack, target_stack = _padded(sources, size), _padded(targets, size).detach()
    # the cost stack and one buffer for every iteration's arguments (and the extrapolation's)
    costs, shifted = _WORKSPACE.get((4, size, size), target_stack)
    # inference mode: the ~150 small operations of the iterations skip autograd's bookkeeping
    # (a microsecond each); only the extrapolation below is differentiated
    with torch.inference_mode():
        # three products: the cost of (y, x) is the transpose of that of (x, y)
        full_x, full_y = with_fixed
        ground_cost(
            _padded([full_x, full_y, full_x], size),
            _padded([full_x, full_y, full_y], size),
            p,
            out=costs[:3],
        )
        costs[3].copy_(costs[2].mT)
        if from_cost:
            diameter = float((p * costs[2, :n, :m].max()) ** (1.0 / p))
        # a given diameter below the blur is GeomLoss' schedule (diameter^p, then blur^p); the
        # largest cost starts at the blur at least (the alignment gives GeomLoss the same),
        # and so does a zero diameter (coincident points), on which GeomLoss fails
        if from_cost or diameter <= 0:
            diameter = max(diameter, blur)

        # the soft-min in base 2 (exp2 is several times faster than exp on a CPU):
        # -eps log sum_j exp(s_j) = -eps ln 2 log2 sum_j 2^(s_j log2 e)
        log_weights2 = log_weights * _LOG2E

        def update(eps: float, potentials: torch.Tensor, rows: slice) -> torch.Tensor:
            """The soft-min of the problems ``rows`` of the stack."""
            h = torch.add(log_weights2[rows], potentials[partner[rows]], alpha=_LOG2E / eps)
            arguments = shifted[rows]
            torch.add(h[:, None, :], costs[rows], alpha=-_LOG2E / eps, out=arguments)
            top = arguments.amax(2, keepdim=True)
            total = arguments.sub_(top).clamp_min_(_EXP2_FLOOR).exp2_().sum(2)  # in place
            return (total.log2_() + top.squeeze(2)).mul_(-eps * damping(eps) / _LOG2E)

        eps_list = epsilon_schedule(p, diameter, blur, scaling)
        joins = 0  # the temperature at which the symmetric problems join
        if schedule == "short":
            joins = max(len(eps_list) - _SYMMETRIC_TEMPERATURES, 0)
        elif schedule != "geomloss":
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        # unbalanced, the short schedule's cross problems keep their first soft-min at the first
        # temperature, without the averaged update: the kernel is nearly flat there
        # (diameter^p) and the relaxed marginals damp that soft-min by 1 / (1 + eps / rho)
        first_average = rho is None or joins == 0  # GeomLoss' schedule: joins is 0
        potentials = torch.zeros_like(log_weights)
        for i, eps in enumerate(eps_list):
            # the cross problems start at the first temperature, the symmetric ones where
            # they join, each from one soft-min of zero potentials
            first = slice(0 if i == joins else 2, 4 if i == 0 else 2)
            if first.start < first.stop:
                potentials[first] = update(eps, potentials, first)
            if i > 0 or first_average:
                rows = slice(0 if i >= joins else 2, 4)
                potentials[rows].lerp_(update(eps, potentials, rows), 0.5)  # the average

    # the last extrapolation carries the gradient; each cost sees the other cloud detached
    eps = eps_list[-1]
    h = log_weights + potentials[partner] / eps
    if p == 2:
        stacked = _SquaredCostLogSumExp.apply(source_stack, target_stack, costs, h, eps, shifted)
    else:
        stacked = _padded(
            [
                logsumexp(h[k, None, : len(t)] - ground_cost(s, t.detach(), p) / eps, 1)
                for k, (s, t) in enumerate(zip(sources, targets, strict=True))
            ],
            size,
        )
    # the rows f_aa, g_bb, f_ba, g_ab, each weighed by its own cloud's measure (0 on padding),
    # the cross problems' with the opposite sign: the divergence is one weighted sum
    final = stacked * (-eps * damping(eps))
    with torch.no_grad():
        measure = _padded([a_log, b_log, a_log, b_log], size, fill=-math.inf).exp()
        signed = measure * measure.new_tensor([1.0, 1.0, -1.0, -1.0])[:, None]
    if n != m:  # padded rows are finite but belong to no cloud: nothing may overflow there
        final = final.masked_fill(measure == 0, 0.0)
    if rho is None:  # a.(f_ba - f_aa) + b.(g_ab - g_bb)
        return -(signed * final).sum()
    weight = rho + eps / 2  # GeomLoss' UnbalancedWeight in the forward pass
    return weight * (signed * (final / -rho).exp()).sum()
