"""LayerNorm and RMSNorm: PyTorch references and the fused kernels (csrc/norm/), with a residual-add variant.

With `residual`, both ops return (normed, x + residual): the sum is the next residual stream, and the
fused kernel writes it in the same pass that computes the statistics. Statistics are fp32 whatever the
input dtype; weight/bias enter the kernels as fp32 and their grads are accumulated in fp32.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from neox.errors import KernelError

from . import _backend as B

Out = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                         residual: Optional[torch.Tensor] = None) -> Out:
    h = x if residual is None else x + residual
    b = None if bias is None else bias.to(h.dtype)
    y = F.layer_norm(h, (h.shape[-1],), weight.to(h.dtype), b, eps)
    return y if residual is None else (y, h)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: Optional[torch.Tensor] = None) -> Out:
    h = x if residual is None else x + residual
    y = F.rms_norm(h, (h.shape[-1],), weight.to(h.dtype), eps)
    return y if residual is None else (y, h)


class _NormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, x, residual, weight, bias, eps: float, rms: bool):
        ctx.set_materialize_grads(False)
        C = x.shape[-1]
        N = x.numel() // C
        y = B.empty(x.shape, x.dtype, x.device)
        h = None if residual is None else B.empty(x.shape, x.dtype, x.device)
        mean = B.empty((N,), torch.float32, x.device)
        rstd = B.empty((N,), torch.float32, x.device)
        ext.norm_forward(x, residual, weight, bias, y, h, mean, rstd, eps, rms)
        ctx.save_for_backward(x if h is None else h, weight, mean, rstd)
        ctx.ext, ctx.rms, ctx.has_residual, ctx.has_bias = ext, rms, residual is not None, bias is not None
        return y if h is None else (y, h)

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, weight, mean, rstd = ctx.saved_tensors
        dy = torch.zeros_like(h) if dy is None else dy.contiguous()
        dh = None if dh is None else dh.contiguous()
        dx = B.empty(h.shape, h.dtype, h.device)
        dw = B.empty(weight.shape, torch.float32, h.device)
        db = B.empty(weight.shape, torch.float32, h.device) if ctx.has_bias else None
        ctx.ext.norm_backward(dy, h, weight, mean, rstd, dh, dx, dw, db, ctx.rms)
        # x and residual get the same gradient; autograd handles one tensor returned twice.
        return None, dx, (dx if ctx.has_residual else None), dw, db, None, None


def _norm(op: str, x, weight, bias, eps, residual, impl, rms: bool) -> Optional[Out]:
    """The fused result, or None when the reference should run."""
    ext = B.choose(op, impl, x.device)
    if ext is None or not B.check_inputs(op, impl, x, weight, bias, residual, same_dtype=(residual,)):
        return None
    if residual is not None and residual.shape != x.shape:
        raise KernelError(f"{op}: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    if x.dim() == 0 or x.numel() == 0 or weight.numel() != x.shape[-1] or (bias is not None and bias.numel() != x.shape[-1]):
        B.unsupported_shape(op, tuple(x.shape), "empty input or weight/bias not of size x.shape[-1]", impl)
        return None
    res = None if residual is None else residual.contiguous()
    return _NormFn.apply(ext, x.contiguous(), res, B.as_float32(weight), B.as_float32(bias), float(eps), rms)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float = 1e-5,
               residual: Optional[torch.Tensor] = None, impl: str = "auto") -> Out:
    """LayerNorm over the last dim; with `residual`, returns (layer_norm(x + residual), x + residual)."""
    out = _norm("layer_norm", x, weight, bias, eps, residual, impl, rms=False)
    return layer_norm_reference(x, weight, bias, eps, residual) if out is None else out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
             residual: Optional[torch.Tensor] = None, impl: str = "auto") -> Out:
    """RMSNorm over the last dim; with `residual`, returns (rms_norm(x + residual), x + residual)."""
    out = _norm("rms_norm", x, weight, None, eps, residual, impl, rms=True)
    return rms_norm_reference(x, weight, eps, residual) if out is None else out
