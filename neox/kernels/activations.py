"""Bias + GeLU and SwiGLU: the references and the fused kernels (csrc/activations/).

bias_gelu(x, bias) = gelu(x + bias) with the add done in fp32 inside the kernel (the bias of the MLP's
first linear is fused here instead of being added by the matmul). `approximate` is "none" (erf, as
torch.nn.GELU) or "tanh" (as GPT-NeoX's fused bias_gelu).
swiglu(x): x [..., 2f] holds (gate, up) pairs, i.e. x.view(..., f, 2); out [..., f] = silu(gate) * up.

CUDA kernel versions (csrc/activations/activations.cu): the environment variable NEOX_ACT_VERSION picks them
for a bench or a test, read at each call: unset, empty or 0 the default (4); 1 or 2 the kernels before 3
(SwiGLU v1, bias_gelu v2); 3; 4; 5 (4 with other loads-in-flight settings, for a sweep). Any other value is
refused here (the C++ side would run 4 or 5 for it).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from neox.errors import KernelError

from . import _backend as B


ACT_VERSIONS = ("", "0", "1", "2", "3", "4", "5")


def check_act_version() -> None:
    """Refuse a NEOX_ACT_VERSION the CUDA launchers do not know (they would run the newest kernels)."""
    v = os.environ.get("NEOX_ACT_VERSION", "")
    if v not in ACT_VERSIONS:
        raise KernelError(f"NEOX_ACT_VERSION={v!r} is not a version of the activation kernels; "
                          "set 1 or 2 (before v3), 3, 4, 5, or unset it for the default (4)")


def bias_gelu_reference(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str = "none") -> torch.Tensor:
    return F.gelu(x if bias is None else x + bias.to(x.dtype), approximate=approximate)


def swiglu_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.unflatten(-1, (-1, 2)).unbind(-1)
    return F.silu(gate) * up


def bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor], impl: str = "auto",
              approximate: str = "none") -> torch.Tensor:
    """gelu(x + bias); bias [x.shape[-1]] or None."""
    if approximate not in ("none", "tanh"):
        raise KernelError(f"bias_gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    C = x.shape[-1] if x.dim() else 0
    odd = x.numel() == 0 or (bias is not None and bias.numel() != C)
    ext = B.fused_extension("bias_gelu", impl, x, bias,
                            unsupported="empty input or bias not of size x.shape[-1]" if odd else None)
    if ext is None:
        return bias_gelu_reference(x, bias, approximate)
    if x.is_cuda:
        check_act_version()
    # a C++ autograd node (csrc/common/autograd.inc): less host time than a Python Function
    return ext.bias_gelu_apply(x.contiguous(), bias, approximate == "tanh", B.POISON_OUTPUTS)


def swiglu(x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """silu(gate) * up with (gate, up) = x[..., 0::2], x[..., 1::2]; returns [..., x.shape[-1] // 2]."""
    if x.dim() == 0 or x.shape[-1] % 2:
        raise KernelError(f"swiglu: last dim must be even (gate, up pairs), got shape {tuple(x.shape)}")
    ext = B.fused_extension("swiglu", impl, x)
    if ext is None:
        return swiglu_reference(x)
    if x.is_cuda:
        check_act_version()
    return B.apply_saved_tensor_kernel(ext, "swiglu", x.contiguous(), out_shape=(*x.shape[:-1], x.shape[-1] // 2))
