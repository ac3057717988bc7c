"""Elementwise functions of tensors that carry no gradient, faster on a CPU.

On the CPU we benchmark on (AMD EPYC with AVX-512, torch 2.13, one thread), NumPy takes
about 40 % of torch's time for ``log``, 60 % for ``log1p`` and a tenth for a comparison with
zero, on a ``256 x 2,000`` float32 array (206 / 523, 231 / 415 and 32 / 317 us). The
likelihoods make these passes over every entry of a minibatch at each step: the encoder's
input transform, the negative binomial's ``log(theta + mu)``, the nonzeros of the counts.
Tensors on other devices, of other dtypes, or that require a gradient use torch.
"""

from __future__ import annotations

import numpy as np
import torch

_NUMPY_DTYPES = (torch.float32, torch.float64)


def _elementwise(numpy_fn, torch_fn, t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES and not t.requires_grad:
        return torch.from_numpy(np.asarray(numpy_fn(t.numpy())))  # asarray: a 0-d result
    return torch_fn(t)


def log(t: torch.Tensor) -> torch.Tensor:
    """``torch.log(t)``, computed by NumPy for a CPU tensor without gradient."""
    return _elementwise(np.log, torch.log, t)


def log1p(t: torch.Tensor) -> torch.Tensor:
    """``torch.log1p(t)``, computed by NumPy for a CPU tensor without gradient."""
    return _elementwise(np.log1p, torch.log1p, t)


def flat_nonzero(t: torch.Tensor) -> torch.Tensor:
    """Indices (``int64``) of the nonzero entries of a CPU tensor, flattened in row-major order.

    NumPy's comparison and ``flatnonzero``: 0.35 ms for 512,000 entries at 8 % nonzeros,
    where torch's ``!=`` then ``flatnonzero`` takes 0.66 ms and ``Tensor.nonzero`` 1.1 ms.
    """
    if t.device.type != "cpu":
        raise ValueError(f"flat_nonzero needs a CPU tensor, got one on {t.device}")
    return torch.from_numpy(np.flatnonzero(t.detach().reshape(-1).numpy() != 0))
