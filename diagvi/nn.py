"""Neural building blocks: the cell encoder (x2z), its optional principal-component input and
the bilinear decoder (z2x)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal

_MIN_SCALE = 1e-4  # keeps posterior scales positive without clamping their gradient


class Dropout(nn.Dropout):
    """:class:`torch.nn.Dropout` whose mask, on a CPU, comes from 16-bit random integers.

    torch's CPU Bernoulli sampler draws a 32-bit number per element; four 16-bit fields of
    one 64-bit draw are about twice as cheap (a 256 x 256 mask: 0.95 -> 0.41 ms, a large part of
    an encoder's forward on small inputs). The drop probability is rounded to a multiple of
    1/65,536. Other devices, and ``p`` of 0 or 1, use torch's dropout.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or not 0.0 < self.p < 1.0:
            return super().forward(x)
        n = x.numel()
        draws = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        # compared in place as float32 (exact for 16-bit integers): a boolean mask and its
        # conversion cost twice as much
        fields = draws.view(torch.int16)[:n].view(x.shape).float()
        keep = fields.ge_(round(self.p * 65536) - 32768)  # fields uniform over [-32768, 32767]
        return x * keep.mul_(1.0 / (1.0 - self.p)).to(x.dtype)


class Encoder(nn.Module):
    """MLP mapping a (transformed) expression vector to a diagonal Gaussian posterior q(z|x).

    Parameters
    ----------
    n_input
        Number of features of the modality.
    n_latent
        Dimension of the cell latent ``z``.
    n_hidden, n_layers, dropout
        Width, depth and dropout of the hidden layers (LayerNorm + LeakyReLU each).
    """

    def __init__(
        self,
        n_input: int,
        n_latent: int,
        n_hidden: int = 256,
        n_layers: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_input
        for _ in range(n_layers):
            layers += [
                nn.Linear(width, n_hidden),
                nn.LayerNorm(n_hidden),
                nn.LeakyReLU(0.2),
                Dropout(dropout),
            ]
            width = n_hidden
        self.body = nn.Sequential(*layers)
        self.loc = nn.Linear(width, n_latent)
        self.scale = nn.Linear(width, n_latent)

    def forward(self, x: torch.Tensor) -> Normal:
        h = self.body(x)
        # both heads as one product of their stacked weights: one matrix product forward and
        # two backward instead of two and four (a step on small inputs is mostly such fixed
        # costs); the parameters stay two layers, as saved models have them
        weight = torch.cat([self.loc.weight, self.scale.weight])
        bias = torch.cat([self.loc.bias, self.scale.bias])
        # float32 parameters also under mixed precision: the KL and the losses on z need them
        loc, scale = F.linear(h, weight, bias).float().chunk(2, -1)
        # positive by construction: the argument checks would cost a pass over both tensors
        return Normal(loc, F.softplus(scale) + _MIN_SCALE, validate_args=False)


def principal_axes(
    centred: torch.Tensor, k: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` principal axes of a centred ``cells x features`` matrix.

    Returns ``(basis, singular)``: the right singular vectors as columns (``features x k``, or
    fewer columns when the matrix has lower rank), each signed so that its largest loading is
    positive (refits agree), and the singular values. An exact SVD for small matrices, else
    torch's seeded randomised ``svd_lowrank`` (torch's CPU and CUDA random states are left
    untouched).
    """
    if min(centred.shape) <= k + 10:
        _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
        basis = vh.T
    else:
        # seed and restore only the generator svd_lowrank draws from: torch.manual_seed would
        # also reseed every CUDA device (at CUDA's start when not started yet), which fork_rng
        # does not restore: the caller's GPU random stream would restart from this seed
        device = centred.device
        cuda = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda, device_type="cuda"):
            if device.type == "cpu":
                torch.default_generator.manual_seed(seed)
            elif cuda:
                torch.cuda.default_generators[device.index].manual_seed(seed)
            else:  # another accelerator: seeded (and left seeded) as before
                torch.manual_seed(seed)
            _, singular, basis = torch.svd_lowrank(centred, q=k + 10, niter=4)
    basis, singular = basis[:, :k], singular[:k]
    return basis * torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True))), singular


class PrincipalComponents(nn.Module):
    """The top ``k`` principal components of an encoder's input: ``(x - mean) @ components``.

    Fitted once (:meth:`fit`) on a sample of the transformed training inputs; the components and
    the offset ``-mean @ components`` are buffers, so they are saved and loaded with the model.
    The components are centred, not scaled: on the benchmark's CITE-seq pairs they paired the
    modalities better than z-scored or whitened ones (``experiments/alignment_defaults``,
    eleventh round).

    Parameters
    ----------
    n_features
        Number of input features.
    n_components
        Number of components ``k`` (at most ``n_features``).
    """

    def __init__(self, n_features: int, n_components: int) -> None:
        super().__init__()
        if not 1 <= n_components <= n_features:
            raise ValueError(f"n_components must lie in [1, {n_features}], got {n_components}")
        self.register_buffer("components", torch.eye(n_features, n_components))
        self.register_buffer("offset", torch.zeros(n_components))  # -mean @ components
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def n_components(self) -> int:
        return self.components.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.fitted):
            raise RuntimeError("PrincipalComponents used before fit(); fit it on sample inputs")
        return torch.addmm(self.offset, x.to(self.components.dtype), self.components)

    @torch.no_grad()
    def fit(self, x: torch.Tensor, seed: int = 0, overwrite: bool = False) -> PrincipalComponents:
        """Fit the mean and the components on ``x`` (cells x features).

        ``overwrite=True`` centres a float32 ``x`` in place instead of in a copy.
        """
        x = x.float()
        mean = x.mean(0)
        basis, _ = principal_axes(x.sub_(mean) if overwrite else x - mean, self.n_components, seed)
        self.components.zero_()[:, : basis.shape[1]] = basis  # fewer cells than k: zeros
        self.offset.copy_(-(mean @ self.components))
        self.fitted.fill_(True)
        return self


class BilinearDecoder(nn.Module):
    """``eta = softplus(alpha_s) * (z @ v.T) + beta_s``: cell and feature embeddings meet here.

    ``alpha_s`` and ``beta_s`` are per batch ``s`` and per feature, so batch effects are absorbed
    by the decoder instead of the shared latent space.

    Parameters
    ----------
    n_features
        Number of features of the modality.
    n_batches
        Number of batches of the modality (1 when it has no batch key).
    """

    def __init__(self, n_features: int, n_batches: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(n_batches, n_features))
        self.beta = nn.Parameter(torch.zeros(n_batches, n_features))

    def forward(self, z: torch.Tensor, v: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        scale, bias = F.softplus(self.alpha), self.beta
        if len(scale) > 1:  # one batch: the rows broadcast over the cells, no copy
            scale, bias = scale[batch], bias[batch]
        return torch.addcmul(bias, scale, (z @ v.T).float())
