"""Bias + GeLU and SwiGLU: the references and the fused kernels (csrc/activations/).

bias_gelu(x, bias) = gelu(x + bias) with the add done in fp32 inside the kernel (the bias of the MLP's
first linear is fused here instead of being added by the matmul). `approximate` is "none" (erf, as
torch.nn.GELU) or "tanh" (as GPT-NeoX's fused bias_gelu).
swiglu(x): x [..., 2f] holds (gate, up) pairs, i.e. x.view(..., f, 2); out [..., f] = silu(gate) * up.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from neox.errors import KernelError

from . import _backend as B


def bias_gelu_reference(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str = "none") -> torch.Tensor:
    return F.gelu(x if bias is None else x + bias.to(x.dtype), approximate=approximate)


def swiglu_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.unflatten(-1, (-1, 2)).unbind(-1)
    return F.silu(gate) * up


class _BiasGeluFn(torch.autograd.Function):
    # The bias is cast to fp32 here, outside autograd; the engine casts the fp32 dbias back to its dtype.
    @staticmethod
    def forward(ctx, ext, x, bias, tanh_approx: bool):
        b32 = torch.zeros(x.shape[-1], device=x.device) if bias is None else B.as_float32(bias)
        y = B.empty(x.shape, x.dtype, x.device)
        ext.bias_gelu_forward(x, b32, y, tanh_approx)
        ctx.save_for_backward(x, b32)
        ctx.ext, ctx.tanh_approx, ctx.has_bias = ext, tanh_approx, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, b32 = ctx.saved_tensors
        dy = dy.contiguous()
        dx = B.empty(x.shape, x.dtype, x.device)
        dbias = B.empty(b32.shape, torch.float32, x.device)
        ctx.ext.bias_gelu_backward(dy, x, b32, dx, dbias, ctx.tanh_approx)
        return None, dx, (dbias if ctx.has_bias else None), None


class _SwigluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, x):
        y = B.empty((*x.shape[:-1], x.shape[-1] // 2), x.dtype, x.device)
        ext.swiglu_forward(x, y)
        ctx.save_for_backward(x)
        ctx.ext = ext
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dy = dy.contiguous()
        dx = B.empty(x.shape, x.dtype, x.device)
        ctx.ext.swiglu_backward(dy, x, dx)
        return None, dx


def bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor], impl: str = "auto",
              approximate: str = "none") -> torch.Tensor:
    """gelu(x + bias); bias [x.shape[-1]] or None."""
    if approximate not in ("none", "tanh"):
        raise KernelError(f"bias_gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    ext = B.choose("bias_gelu", impl, x.device)
    if ext is not None and B.check_inputs("bias_gelu", impl, x, bias):
        C = x.shape[-1] if x.dim() else 0
        if x.numel() == 0 or (bias is not None and bias.numel() != C):
            B.unsupported_shape("bias_gelu", tuple(x.shape), "empty input or bias not of size x.shape[-1]", impl)
        else:
            return _BiasGeluFn.apply(ext, x.contiguous(), bias, approximate == "tanh")
    return bias_gelu_reference(x, bias, approximate)


def swiglu(x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """silu(gate) * up with (gate, up) = x[..., 0::2], x[..., 1::2]; returns [..., x.shape[-1] // 2]."""
    if x.dim() == 0 or x.shape[-1] % 2:
        raise KernelError(f"swiglu: last dim must be even (gate, up pairs), got shape {tuple(x.shape)}")
    ext = B.choose("swiglu", impl, x.device)
    if ext is not None and B.check_inputs("swiglu", impl, x):
        if x.numel() == 0:
            B.unsupported_shape("swiglu", tuple(x.shape), "empty input", impl)
        else:
            return _SwigluFn.apply(ext, x.contiguous())
    return swiglu_reference(x)
