"""A linear layer, y = x @ W^T + b, whose backward does two things autograd's does not.

- The bias gradient is the `bias_grad` kernel (csrc/activations/): column sums of the output gradient
  at about copy bandwidth. torch takes them with a generic dim-0 reduction: on an H200, 18 ms of a
  1.05 s Pythia-1.4B step for the qkv, attention-out and fc_out biases.
- With `accumulate`, a weight that already has a gradient (the second and later micro-batches of an
  accumulation) gets this one added inside the weight-gradient GEMM (`grad.addmm_(dy^T, x)`, beta = 1),
  and autograd receives None for it. Otherwise autograd's AccumulateGrad adds a fresh gradient tensor
  into .grad: one more read of both and a write per weight and micro-batch (15 ms of that 1.4B step).
  The bias's fp32 column sums are added into its .grad the same way (one add where a cast to the
  bias's dtype and AccumulateGrad's add made two kernels: small ones, ~8 per layer and micro-batch with
  the launch gaps between them).
  Only for an engine that reads .grad after the backward and hooks nothing on the accumulation
  (DeepSpeed's ZeRO-0 optimizer without pipeline parallelism: the trainer says when); the sum is
  rounded once instead of twice, so it is not bitwise the two-step sum. Any backward through such a layer
  adds into .grad, `torch.autograd.grad(..., inputs=[x])` included: the trainer's only backward is
  `engine.backward`; a feature that takes other gradients through the training model must turn it off.

The forward is F.linear itself. On CPU `impl="auto"` keeps autograd's linear: torch's reduction is as
fast there, and CPU runs stay bitwise equal to the tensor-parallel layers' (tests compare them).
Under torch.compile this is F.linear too: inductor fuses the bias reduction itself.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _backend as B


def bias_grad_reference(dy: torch.Tensor) -> torch.Tensor:
    """Column sums of dy [..., C] over every leading dim, in fp32."""
    return dy.reshape(-1, dy.shape[-1]).sum(0, dtype=torch.float32)


def bias_grad(dy: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Column sums of dy [..., C] over every leading dim, in fp32 (a linear layer's bias gradient)."""
    ext = B.fused_extension("linear", impl, dy)
    return bias_grad_reference(dy) if ext is None else _fused_bias_grad(ext, dy)


def _fused_bias_grad(ext, dy: torch.Tensor) -> torch.Tensor:
    out = B.empty((dy.shape[-1],), torch.float32, dy.device)
    ext.bias_grad(dy.contiguous(), out)
    return out


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, x, weight, bias, accumulate: bool):
        ctx.save_for_backward(x, weight)
        ctx.ext, ctx.param, ctx.bias, ctx.accumulate = ext, weight, bias, accumulate
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[1]:
            dx = (dy2 @ weight).view(x.shape)
        if ctx.needs_input_grad[2]:
            x2 = x.reshape(-1, x.shape[-1])
            held = ctx.param.grad
            if ctx.accumulate and held is not None and held.dtype == dy.dtype and held.is_contiguous():
                held.addmm_(dy2.t(), x2)  # into .grad in the GEMM; autograd adds nothing
            else:
                dw = dy2.t() @ x2
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = _fused_bias_grad(ctx.ext, dy2)
            held = ctx.bias.grad if ctx.accumulate else None
            if held is not None and held.dtype == dy.dtype and held.is_contiguous():
                held.add_(db)  # the fp32 sums into .grad, rounded once; autograd adds nothing
                db = None
            else:
                db = db.to(dy.dtype)
        return None, dx, dw, db, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, impl: str = "auto",
           accumulate: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias) with the backward above where the kernel runs, else F.linear itself.
    accumulate: add the weight gradient into weight.grad inside the GEMM when .grad exists (see the module
    docstring for when that is allowed)."""
    if torch.compiler.is_compiling() or not weight.requires_grad or not torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    ext = B.fused_extension("linear", impl, x, weight, bias)
    if ext is None or x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        return F.linear(x, weight, bias)
    return _LinearFn.apply(ext, x, weight, bias, accumulate)


class AccumulatingLinear(torch.nn.Linear):
    """nn.Linear through `linear(..., accumulate=True)`; `matmul(x)` is its output before the bias (what
    gpt.linear_before_bias calls for the fused bias-GeLU). Made by `accumulate_in_gemm` only."""

    linear_impl: str = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.linear_impl, accumulate=True)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, None, self.linear_impl, accumulate=True)


def accumulate_in_gemm(model: torch.nn.Module, impl: str = "auto") -> int:
    """Make every plain nn.Linear of `model` an `AccumulatingLinear` (in place: same parameters, names and
    hooks, which module calls still run): for an engine that reads .grad only after the accumulation and
    hooks nothing on it. Layers of another class (tensor-parallel, fp8) are left as they are. Returns how
    many."""
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear]
    for m in layers:
        m.__class__ = AccumulatingLinear
        m.linear_impl = impl
    return len(layers)
