"""LayerNorm and RMSNorm: PyTorch references and the fused kernels (csrc/norm/), with a residual-add variant.

With `residual`, both ops return (normed, x + residual): the sum is the next residual stream, and the
fused kernel writes it in the same pass that computes the statistics. `dual_norm` is the parallel
residual's pair of norms of one input, as one autograd node that also returns the input (see there). Statistics are fp32 whatever the
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


DualOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def dual_norm_reference(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                        b2: Optional[torch.Tensor], eps: float, rms: bool) -> DualOut:
    if rms:
        return x, rms_norm_reference(x, w1, eps), rms_norm_reference(x, w2, eps)
    return x, layer_norm_reference(x, w1, b1, eps), layer_norm_reference(x, w2, b2, eps)


def dual_norm(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
              b2: Optional[torch.Tensor], eps: float = 1e-5, rms: bool = False, impl: str = "auto") -> DualOut:
    """(x, norm(x; w1, b1), norm(x; w2, b2)): LayerNorm, or RMSNorm with `rms` (no biases), under the impl
    of layer_norm/rms_norm. Fused, the three outputs come from one C++ autograd node (the returned x is a
    view of x): its backward gets the grads of all three at once and sums them inside the two norm
    backwards (their residual-grad input), where separate norms leave autograd two more [N, C] adds."""
    op = "rms_norm" if rms else "layer_norm"
    if rms and (b1 is not None or b2 is not None):
        raise KernelError("dual_norm: RMSNorm takes no bias; pass b1=b2=None")
    ext = B.choose(op, impl, x.device)
    if ext is None or not B.check_inputs(op, impl, x, w1, b1, w2, b2):
        return dual_norm_reference(x, w1, b1, w2, b2, eps, rms)
    C = x.shape[-1] if x.dim() else 0
    if x.numel() == 0 or any(t is not None and t.numel() != C for t in (w1, b1, w2, b2)):
        B.unsupported_shape(op, tuple(x.shape), "empty input or weight/bias not of size x.shape[-1]", impl)
        return dual_norm_reference(x, w1, b1, w2, b2, eps, rms)
    x_out, y1, y2 = ext.dual_norm_apply(x.contiguous(), w1, b1, w2, b2, float(eps), rms, B.POISON_OUTPUTS)
    return x_out, y1, y2
