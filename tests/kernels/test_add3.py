"""`kernels.add3` (out = x + a + b in one pass, the sum in fp32 rounded once) against the exact fp32 sum of
the same values, on CPU (CI) and CUDA (-m gpu), outputs poisoned (conftest); its backward gives every input
the output's grad. Sizes cover the CUDA kernel's 16-byte packs, the elements past the last whole pack,
unaligned inputs (one-element path) and more packs than one grid-stride sweep."""
from __future__ import annotations

import pytest
import torch

from neox import kernels as K
from neox.errors import KernelError
from neox.kernels import _backend

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CUDA_ONLY = [pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                            reason="no CUDA device visible")])]


def _exact(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(x + a) + b in fp32, rounded once to x's dtype: what the kernels compute, bit for bit."""
    return (x.float() + a.float() + b.float()).to(x.dtype)


def _check(shape: tuple, dtype: torch.dtype, device: str, seed: int, offset: int = 0) -> None:
    n = int(torch.tensor(shape).prod())
    # offset > 0: views that start mid-way into a buffer, so 16-byte alignment is lost
    x, a, b = ((torch.randn(n + offset) * s).to(device, dtype)[offset:].view(shape) for s in (4.0, 1.0, 0.25))
    x, a, b = (t.requires_grad_() for t in (x, a, b))
    out = K.add3(x, a, b, impl="fused")
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, _exact(x, a, b)), (
        f"add3 {shape} {dtype} offset {offset}: max diff {(out.float() - _exact(x, a, b).float()).abs().max()} "
        f"(seed {seed})")
    g = torch.randn(shape).to(device, dtype)
    out.backward(g)
    for name, t in zip("xab", (x, a, b)):
        assert torch.equal(t.grad, g), f"grad {name} is not the output's grad (seed {seed})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 37), (4, 2051)])
def test_add3(device, seed, dtype, shape):
    _check(shape, dtype, device, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add3_unaligned(device, seed, dtype):
    _check((3, 1001), dtype, device, seed, offset=1)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add3_grid_stride(device, seed, dtype):
    """More packs than 16 blocks per SM x 256 threads take in one sweep, plus a partial pack at the end."""
    _check((4, 2048, 2048 + 3), dtype, device, seed)


def test_add3_rounds_once(device):
    """The point of forming the sum in fp32: 1 + 2^-8 + 2^-8 is 1.0078125 in bf16, while bf16's (1 + 2^-8) + 2^-8
    rounds the intermediate to 1 (ties to even) and ends at 1."""
    x, a = torch.ones(9, device=device, dtype=torch.bfloat16), torch.full((9,), 2.0 ** -8, device=device,
                                                                           dtype=torch.bfloat16)
    assert (K.add3(x, a, a, impl="reference") == 1).all()
    assert (K.add3(x, a, a, impl="fused") == 1 + 2.0 ** -7).all()


def test_add3_without_grad(device):
    x, a, b = (torch.randn(5, 6, device=device) for _ in range(3))
    out = K.add3(x, a, b, impl="fused")
    assert not out.requires_grad and torch.equal(out, _exact(x, a, b))
    a.requires_grad_()
    out = K.add3(x, a, b, impl="fused")
    out.sum().backward()
    assert torch.equal(a.grad, torch.ones_like(a)) and x.grad is None


def test_add3_bad_input(device):
    x = torch.randn(4, 6, device=device)
    with pytest.raises(KernelError, match="dtype mismatch"):
        K.add3(x, x.bfloat16(), x, impl="fused")
    _backend._warned.discard("add3:(4, 6)")
    with pytest.warns(UserWarning, match="not supported by the fused kernel"):
        out = K.add3(x, x[0], x, impl="fused")  # a broadcast: the reference's
    torch.testing.assert_close(out, x + x[0] + x)
    assert torch.equal(K.add3(x.double(), x.double(), x.double()), 3 * x.double())  # auto: reference, no kernel
