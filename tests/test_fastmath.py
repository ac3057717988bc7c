"""diagvi.fastmath: NumPy-backed elementwise functions agree with torch's."""

import numpy as np
import pytest
import torch

from diagvi import fastmath


@pytest.fixture(params=[True, False], ids=["numpy", "torch"])
def backend(request, monkeypatch):
    """Both paths of log and log1p, whichever this CPU takes."""
    monkeypatch.setattr(fastmath, "NUMPY_TRANSCENDENTALS", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["log", "log1p"])
def test_matches_torch(name, dtype, backend):
    x = torch.rand(64, 33, dtype=dtype) * 50 + 1e-3
    got, want = getattr(fastmath, name)(x), getattr(torch, name)(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=5e-7 if dtype == torch.float32 else 1e-15, atol=0)


@pytest.mark.parametrize("name", ["log", "log1p"])
def test_strided_input(name, backend):
    x = (torch.rand(40, 30) + 0.5).T[::2]  # neither contiguous nor row-major
    torch.testing.assert_close(getattr(fastmath, name)(x), getattr(torch, name)(x))


def test_gradient_and_other_dtypes_use_torch(backend):
    x = torch.rand(8, 5, requires_grad=True)
    y = fastmath.log1p(x)
    assert y.requires_grad
    y.sum().backward()
    torch.testing.assert_close(x.grad, 1.0 / (1.0 + x.detach()))
    counts = torch.randint(0, 9, (6, 4))  # NumPy would return float64 for ints; torch float32
    assert fastmath.log1p(counts).dtype == torch.log1p(counts).dtype


def test_flat_nonzero():
    x = torch.poisson(torch.rand(30, 17) * 0.3)
    want = torch.nonzero(x.reshape(-1)).squeeze(1)
    assert torch.equal(fastmath.flat_nonzero(x), want)
    assert fastmath.flat_nonzero(x).dtype == torch.int64
    strided = x.T  # flattened in the view's own row-major order
    assert torch.equal(
        fastmath.flat_nonzero(strided), torch.nonzero(strided.reshape(-1)).squeeze(1)
    )
    assert fastmath.flat_nonzero(torch.zeros(3, 4)).numel() == 0


@pytest.mark.parametrize("name", ["log", "log1p"])
def test_scalar_and_empty(name, backend):
    for x in (torch.tensor(2.5), torch.empty(0, 3)):
        got, want = getattr(fastmath, name)(x), getattr(torch, name)(x)
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["log", "log1p"])
def test_numpy_only_where_chosen(name, backend, monkeypatch):
    calls = []
    numpy_fn = getattr(np, name)
    monkeypatch.setattr(np, name, lambda a: calls.append(a.shape) or numpy_fn(a))
    x = torch.rand(5, 3) + 0.5
    torch.testing.assert_close(getattr(fastmath, name)(x), getattr(torch, name)(x))
    assert calls == ([(5, 3)] if backend else [])


def test_numpy_chosen_by_its_cpu_dispatch():
    # the flag is NumPy's own report of its AVX-512 loops on this machine
    assert fastmath.NUMPY_TRANSCENDENTALS == fastmath._numpy_has_avx512()
    assert isinstance(fastmath.NUMPY_TRANSCENDENTALS, bool)
