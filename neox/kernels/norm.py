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


def _params_fp32(weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """weight and bias as contiguous fp32 for the kernels: as they are when already fp32, else cast in one
    launch for both (at these sizes the launch, not the copy, is the cost)."""
    if weight.dtype == torch.float32 or bias is None or bias.dtype != weight.dtype:
        return B.as_float32(weight), B.as_float32(bias)
    buf = torch.empty((2, weight.numel()), dtype=torch.float32, device=weight.device)
    torch._foreach_copy_([buf[0], buf[1]], [weight.reshape(-1), bias.reshape(-1)])
    return buf[0], buf[1]


class _NormFn(torch.autograd.Function):
    # weight/bias come in as they are and are cast to fp32 here, outside autograd, and their fp32 grads
    # are cast back here too: one cast launch each way instead of one per tensor plus graph nodes. These
    # ops take ~0.1 ms on a GPU, so per-call host work (launches above all) is a large share of it.
    @staticmethod
    def forward(ctx, ext, x, residual, weight, bias, eps: float, rms: bool):
        ctx.set_materialize_grads(False)
        C = x.shape[-1]
        N = x.numel() // C
        w32, b32 = _params_fp32(weight, bias)
        y = B.empty(x.shape, x.dtype, x.device)
        h = None if residual is None else B.empty(x.shape, x.dtype, x.device)
        mean = B.empty((N,), torch.float32, x.device)
        rstd = B.empty((N,), torch.float32, x.device)
        ext.norm_forward(x, residual, w32, b32, y, h, mean, rstd, eps, rms)
        ctx.save_for_backward(x if h is None else h, w32, mean, rstd)
        ctx.ext, ctx.rms, ctx.has_residual = ext, rms, residual is not None
        ctx.w_meta = (weight.shape, weight.dtype)
        ctx.b_meta = None if bias is None else (bias.shape, bias.dtype)
        return y if h is None else (y, h)

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, w32, mean, rstd = ctx.saved_tensors
        dy = torch.zeros_like(h) if dy is None else dy.contiguous()
        dh = None if dh is None else dh.contiguous()
        dx = B.empty(h.shape, h.dtype, h.device)
        w_shape, w_dtype = ctx.w_meta
        if w_dtype == torch.float32 and (ctx.b_meta is None or ctx.b_meta[1] == torch.float32):
            dw = B.empty(w_shape, torch.float32, h.device)
            db = None if ctx.b_meta is None else B.empty(ctx.b_meta[0], torch.float32, h.device)
            ctx.ext.norm_backward(dy, h, w32, mean, rstd, dh, dx, dw, db, ctx.rms)
        else:  # one buffer for both grads, so that one launch casts them back
            has_bias = ctx.b_meta is not None
            dwb = B.empty((2 if has_bias else 1, w32.numel()), torch.float32, h.device)
            ctx.ext.norm_backward(dy, h, w32, mean, rstd, dh, dx, dwb[0], dwb[1] if has_bias else None, ctx.rms)
            if not has_bias or ctx.b_meta[1] == w_dtype:
                dwb = dwb.to(w_dtype)  # else autograd casts each grad to its parameter's dtype
            dw = dwb[0].view(w_shape)
            db = dwb[1].view(ctx.b_meta[0]) if has_bias else None
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
    return _NormFn.apply(ext, x.contiguous(), res, weight, bias, float(eps), rms)


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
