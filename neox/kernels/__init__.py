"""neox's fused kernels, each beside its pure-PyTorch reference.

    from neox import kernels
    y = kernels.layer_norm(x, w, b, eps)                       # or residual=r -> (y, x + r)
    y = kernels.rms_norm(x, w, eps)
    q = kernels.rotary(q, cos, sin, rotary_dims, interleaved=False)
    p = kernels.masked_softmax(scores, scale)
    y = kernels.bias_gelu(x, bias) ; y = kernels.swiglu(x)
    loss = kernels.cross_entropy(logits, targets, ignore_index=-100, group=None, vocab_start=0)

Every op takes impl = "auto" | "fused" | "reference" (ModelConfig.kernels):
- "reference": the PyTorch code in this package; runs anywhere.
- "fused": the compiled kernel (neox._C_cpu / neox._C_cuda, built at install); KernelError if it is not
  available. A shape or dtype the kernel does not take falls back with a one-time warning naming it.
- "auto": the compiled kernel where it is built and measured faster (_backend.AUTO_FUSED), else the
  reference. `describe(mode)` says which in one line; the trainer logs it at start.
"""
from __future__ import annotations

from typing import Union

import torch

from . import _backend
from ._backend import AUTO_FUSED, IMPLS, OPS
from .activations import bias_gelu, bias_gelu_reference, swiglu, swiglu_reference
from .cross_entropy import cross_entropy, cross_entropy_reference
from .norm import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from .rotary import rotary, rotary_reference
from .softmax import masked_softmax, masked_softmax_reference

__all__ = [
    "OPS", "IMPLS", "describe", "status",
    "layer_norm", "rms_norm", "rotary", "masked_softmax", "bias_gelu", "swiglu", "cross_entropy",
    "layer_norm_reference", "rms_norm_reference", "rotary_reference", "masked_softmax_reference",
    "bias_gelu_reference", "swiglu_reference", "cross_entropy_reference",
]


def status(mode: str = "auto", device: Union[str, torch.device, None] = None) -> dict[str, str]:
    """op -> "fused" | "reference" that `mode` resolves to for tensors on `device` (default: cuda if visible)."""
    if mode not in IMPLS:
        from neox.errors import KernelError
        raise KernelError(f"kernels mode must be one of {IMPLS}, got {mode!r}")
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    ext, _ = _backend.extension(dev.type)
    fused = ext is not None and mode != "reference"
    picks = AUTO_FUSED.get(dev.type, frozenset()) if mode == "auto" else frozenset(OPS)
    return {op: ("fused" if fused and op in picks else "reference") for op in OPS}


def describe(mode: str = "auto", device: Union[str, torch.device, None] = None) -> str:
    """One line for the train-start log: which ops run fused, which run the reference, and why.

    e.g. "kernels[auto]: fused CUDA (layer_norm, rms_norm, ...)" or
         "kernels[auto]: reference (all ops) — neox._C_cuda not built: nvcc not found (...)".
    """
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    picks = status(mode, dev)
    fused = [op for op, p in picks.items() if p == "fused"]
    ref = [op for op, p in picks.items() if p == "reference"]
    head = f"kernels[{mode}]:"
    if mode == "reference":
        return f"{head} reference (all ops) — chosen by config (model.kernels=reference)"
    ext, reason = _backend.extension(dev.type)
    if ext is None:
        if mode == "fused":
            return f"{head} NOT AVAILABLE on {dev.type} — {reason}; every op will raise KernelError"
        return f"{head} reference (all ops) — {reason}"
    line = f"{head} fused {dev.type.upper()} ({', '.join(fused)})"
    if ref:
        line += f"; reference ({', '.join(ref)}) — not faster than PyTorch on {dev.type} (measured)"
    if dev.type == "cpu":
        cuda_ext, cuda_reason = _backend.extension("cuda")
        if cuda_ext is None and "no CUDA device" not in cuda_reason:
            line += f" [CUDA: {cuda_reason}]"
    return line
