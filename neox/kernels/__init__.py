"""neox's fused kernels, each beside its pure-PyTorch reference.

    from neox import kernels
    y = kernels.layer_norm(x, w, b, eps)                       # or residual=r -> (y, x + r)
    y = kernels.rms_norm(x, w, eps)
    x, y1, y2 = kernels.dual_norm(x, w1, b1, w2, b2, eps, rms=False)  # the parallel residual's two norms
    out = kernels.add3(x, a, b)                                # x + a + b in one pass
    q = kernels.rotary(q, cos, sin, rotary_dims, interleaved=False)
    qkv = kernels.rotary_qkv_(qkv, cos, sin, rotary_dims, interleaved=False, q_per_kv=1)  # q, k heads in place
    q, k, v = kernels.split_qkv(qkv, cos, sin, rotary_dims, q_per_kv=1)  # the above + split; one-kernel backward
    p = kernels.masked_softmax(scores, scale)
    y = kernels.bias_gelu(x, bias) ; y = kernels.swiglu(x)
    loss = kernels.cross_entropy(logits, targets, ignore_index=-100, group=None, vocab_start=0)
    kernels.adamw_bf16_step_(params16, grads16, masters, exp_avgs, exp_avg_sqs, steps, lr=..., ...)  # optimizer

Every op takes impl = "auto" | "fused" | "reference" (ModelConfig.kernels, per op ModelConfig.kernel_ops):
- "reference": the PyTorch code in this package; runs anywhere.
- "fused": the compiled kernel (neox._C_cpu / neox._C_cuda, built at install); KernelError if it is not
  available. A shape or dtype the kernel does not take falls back with a one-time warning naming it.
- "auto": the compiled kernel where it is built and measured faster (_backend.AUTO_FUSED), else the
  reference. `describe(mode)` says which in one line; the trainer logs it at start. `fuses(op, impl, device)`
  tells a caller that lays out its work differently for the fused op (the MLP's bias, the loss) which runs.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import _backend
from ._backend import AUTO_FUSED, IMPLS, OPS
from .activations import bias_gelu, bias_gelu_reference, swiglu, swiglu_reference
from .adamw import adamw_bf16_step_, adamw_bf16_step_reference, torch_adamw_state
from .cross_entropy import cross_entropy, cross_entropy_reference
from .norm import dual_norm, dual_norm_reference, layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from .residual import add3, add3_reference
from .rotary import (rotary, rotary_qkv_, rotary_qkv_reference, rotary_reference, split_qkv,
                     split_qkv_reference)
from .softmax import masked_softmax, masked_softmax_reference

__all__ = [
    "OPS", "IMPLS", "describe", "status", "fuses",
    "layer_norm", "rms_norm", "rotary", "rotary_qkv_", "split_qkv", "masked_softmax", "bias_gelu", "swiglu",
    "cross_entropy", "dual_norm", "add3",
    "layer_norm_reference", "rms_norm_reference", "rotary_reference", "rotary_qkv_reference", "split_qkv_reference",
    "masked_softmax_reference", "bias_gelu_reference", "swiglu_reference", "cross_entropy_reference",
    "dual_norm_reference", "add3_reference",
    "adamw_bf16_step_", "adamw_bf16_step_reference", "torch_adamw_state",
]


def _check_mode(mode: str) -> None:
    if mode not in IMPLS:
        from neox.errors import KernelError
        raise KernelError(f"kernels mode must be one of {IMPLS}, got {mode!r}")


def fuses(op: str, impl: str, device: Union[str, torch.device]) -> bool:
    """Whether `impl` asks for `op`'s compiled kernel on `device`: always for "fused" (the op then raises
    KernelError where the kernel is not built), for "auto" where it is built and in AUTO_FUSED. A shape or
    dtype the kernel does not take may still fall back, with a warning."""
    _check_mode(impl)
    if impl != "auto":
        return impl == "fused"
    dev = torch.device(device)
    return _backend.extension(dev.type)[0] is not None and op in AUTO_FUSED.get(dev.type, frozenset())


def status(mode: str = "auto", device: Union[str, torch.device, None] = None,
           overrides: Optional[dict[str, str]] = None) -> dict[str, str]:
    """op -> "fused" | "reference" that `mode` (or the op's entry in `overrides`) resolves to for tensors on
    `device` (default: cuda if visible)."""
    _check_mode(mode)
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    overrides = overrides or {}
    built = _backend.extension(dev.type)[0] is not None
    return {op: ("fused" if built and fuses(op, overrides.get(op, mode), dev) else "reference") for op in OPS}


def describe(mode: str = "auto", device: Union[str, torch.device, None] = None,
             overrides: Optional[dict[str, str]] = None) -> str:
    """One line for the train-start log: which ops run fused, which run the reference, and why.

    e.g. "kernels[auto]: fused CUDA (layer_norm, rms_norm, ...)" or
         "kernels[auto]: reference (all ops) — neox._C_cuda not built: nvcc not found (...)".
    """
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    overrides = {op: v for op, v in (overrides or {}).items() if v != mode}
    picks = status(mode, dev, overrides)
    fused = [op for op, p in picks.items() if p == "fused"]
    ref = [op for op, p in picks.items() if p == "reference"]
    head = f"kernels[{mode}" + "".join(f", {op}={v}" for op, v in sorted(overrides.items())) + "]:"
    if mode == "reference" and not fused:
        return f"{head} reference (all ops) — chosen by config (model.kernels=reference)"
    ext, reason = _backend.extension(dev.type)
    if ext is None:
        if "fused" in (mode, *overrides.values()):
            return f"{head} NOT AVAILABLE on {dev.type} — {reason}; the ops set to fused will raise KernelError"
        return f"{head} reference (all ops) — {reason}"
    line = f"{head} fused {dev.type.upper()} ({', '.join(fused)})"
    by_config = [op for op in ref if overrides.get(op, mode) == "reference"]
    measured = [op for op in ref if op not in by_config]
    if measured:
        line += f"; reference ({', '.join(measured)}) — not faster than PyTorch on {dev.type} (measured)"
    if by_config:
        line += f"; reference ({', '.join(by_config)}) — chosen by config"
    if dev.type == "cpu":
        cuda_ext, cuda_reason = _backend.extension("cuda")
        if cuda_ext is None and "no CUDA device" not in cuda_reason:
            line += f" [CUDA: {cuda_reason}]"
    return line
