"""The parallel residual's add, out = x + a + b: PyTorch reference and the one-pass kernel (csrc/residual/).

PyTorch's `x + a + b` is two kernels (six passes over the tensors; the backward is free, each input's grad
being the output's). The fused op reads the three inputs once and writes the sum, formed in fp32 and
rounded once, so it can differ from the reference by one rounding of the 16-bit intermediate x + a.
"""
from __future__ import annotations

import torch

from . import _backend as B


def add3_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x + a + b


def add3(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """x + a + b for three tensors of one shape and dtype (a broadcast falls back to the reference)."""
    ext = B.choose("add3", impl, x.device)
    if ext is None or not B.check_inputs("add3", impl, x, a, b, same_dtype=(a, b)):
        return add3_reference(x, a, b)
    if a.shape != x.shape or b.shape != x.shape or x.numel() == 0:
        B.unsupported_shape("add3", tuple(x.shape), f"empty, or a {tuple(a.shape)} / b {tuple(b.shape)} to "
                                                    "broadcast", impl)
        return add3_reference(x, a, b)
    # One C++ autograd node (csrc/common/autograd.inc): its backward hands the output's grad to all three.
    return ext.add3_apply(x.contiguous(), a.contiguous(), b.contiguous(), B.POISON_OUTPUTS)
