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
    # One C++ autograd node (csrc/common/autograd.inc): a Python autograd.Function's own host cost
    # exceeds this op's GPU time at training shapes.
    out = ext.norm_apply(x.contiguous(), res, weight, bias, float(eps), rms, B.POISON_OUTPUTS)
    return out[0] if residual is None else (out[0], out[1])


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
