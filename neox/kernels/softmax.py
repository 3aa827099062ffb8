"""Scaled upper-triangular (causal) masked softmax: the reference and the fused kernel (csrc/softmax/).

scores [..., sq, sk]: query i sees keys j <= i + (sk - sq), so sq == sk is the usual causal mask and
sq < sk covers cached keys. Used by the non-flash attention path (e.g. ALiBi, which adds its bias to
`scores` first). Any sequence length; computed in fp32, returned in the input dtype, masked entries 0.
"""
from __future__ import annotations

import torch

from neox.errors import KernelError

from . import _backend as B


def masked_softmax_reference(scores: torch.Tensor, scale: float) -> torch.Tensor:
    sq, sk = scores.shape[-2:]
    mask = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).triu(sk - sq + 1)
    return torch.softmax((scores.float() * scale).masked_fill(mask, float("-inf")), dim=-1).to(scores.dtype)


def masked_softmax(scores: torch.Tensor, scale: float, impl: str = "auto") -> torch.Tensor:
    """softmax(scale * scores) under the causal mask, over the last dim of scores [..., sq, sk]."""
    if scores.dim() < 2:
        raise KernelError(f"masked_softmax: scores must be [..., sq, sk], got shape {tuple(scores.shape)}")
    if scores.shape[-2] > scores.shape[-1]:
        raise KernelError(f"masked_softmax: sq={scores.shape[-2]} > sk={scores.shape[-1]} leaves rows fully masked")
    ext = B.fused_extension("masked_softmax", impl, scores)
    if ext is None:
        return masked_softmax_reference(scores, scale)
    return B.apply_saved_tensor_kernel(ext, "masked_softmax", scores.contiguous(), float(scale), save_output=True)
