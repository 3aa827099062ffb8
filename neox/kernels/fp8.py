"""A linear layer's matmul in fp8: torchao's tensorwise dynamic scaling, with neox's cast kernels (csrc/fp8/).

    y = fp8_linear(x, weight, bias=b)               # x @ weight.T + b; forward and backward GEMMs in fp8
    weights = Fp8Weights(); y = fp8_linear(x, weight, weights.get(weight))   # weight cast once per step

The numerics are those of torchao.float8's `matmul_with_hp_or_float8_args` with its default config, bit for bit
(tests/kernels/test_fp8_linear.py): each operand is scaled by fp8_max / its amax at every call (x and weight to
e4m3fn, the output gradient to e5m2), the three GEMMs are torch._scaled_mm with torchao's operand layouts and
use_fast_accum (forward on, backward off), outputs in x's dtype. What differs is the cost: a cast is two kernels
(`fp8_cast`: amax partials, then scale + cast writing the fp8 copy and its transpose from one read) where torchao's
eager cast is ~6 kernels per copy and its compiled one costs ~1.3 ms of host time per block. The forward keeps
only xᵀ in fp8 for the weight gradient (1 byte per element where autograd's linear keeps x in bf16).

Inputs: x bf16 [..., K], weight bf16 [N, K]; K, N and the token count multiples of 16 (the fp8 GEMMs' rule);
`supports(x, weight)` says whether this path takes them (neox.model.fp8 sends the rest to torchao). The weight
gradient goes to autograd (which accumulates it into .grad): torch._scaled_mm cannot add into an output.
A bias (x's dtype) is added in the forward GEMM's epilogue, to the fp32 sums before the one rounding (torchao's
Float8Linear adds it to the rounded output: a separate kernel, and up to one bf16 ulp away), and its gradient is
neox's column-sum kernel (`neox.kernels.linear.bias_grad`, fp32 sums) where autograd's reduction was ~2x slower.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

from neox.errors import KernelError

from . import _backend as B
from .linear import bias_grad

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


class Fp8Weight(NamedTuple):
    """A weight [N, K] in e4m3fn: `data` [N, K] and `data_t` [K, N] (each contiguous), and 1 / its scale."""
    data: torch.Tensor
    data_t: torch.Tensor
    inv_scale: torch.Tensor


def _ext(device: torch.device):
    ext, why = B.extension(device.type)
    if ext is None:
        raise KernelError(f"fp8_linear: the compiled fp8 cast is not available ({why}); reinstall neox's kernels")
    return ext


def fp8_cast(x: torch.Tensor, e5m2: bool = False, plain: bool = True, transposed: bool = False
             ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """torchao's `hp_tensor_to_float8_dynamic` of a 2-d bf16 x (dims multiples of 16), bit for bit: returns
    (x8 if plain, x8ᵀ contiguous if transposed, scale, 1 / scale). Raises KernelError for what it does not take."""
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[0] % 16 or x.shape[1] % 16 or x.numel() == 0:
        raise KernelError(f"fp8_cast: takes a 2-d bfloat16 tensor with dims multiples of 16, got {x.dtype} "
                          f"{tuple(x.shape)}")
    if not (plain or transposed):
        raise KernelError("fp8_cast: plain=False and transposed=False ask for nothing")
    return _ext(x.device).fp8_cast(_aligned(x), e5m2, plain, transposed, B.POISON_OUTPUTS)


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """x contiguous and 16-byte aligned (the kernels' 16-byte loads)."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def cast_weight(weight: torch.Tensor) -> Fp8Weight:
    """The weight's two e4m3fn copies (as the forward's and the input gradient's GEMMs take them), one kernel pass."""
    with torch.no_grad():
        data, data_t, _, inv = fp8_cast(weight.detach(), plain=True, transposed=True)
    return Fp8Weight(data, data_t, inv)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether fp8_linear takes these: bf16 on a device with the compiled cast, K, N and the token count multiples
    of 16."""
    return (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and x.shape[-1] == weight.shape[1] and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0
            and x.numel() > 0 and (x.numel() // x.shape[-1]) % 16 == 0 and x.device == weight.device
            and B.extension(x.device.type)[0] is not None)


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, w8: Fp8Weight, bias: Optional[torch.Tensor],
                ext) -> torch.Tensor:
        K, N = weight.shape[1], weight.shape[0]
        x2 = _aligned(x.reshape(-1, K))
        need_xt = ctx.needs_input_grad[1]  # xᵀ only feeds the weight gradient
        x8, x8_t, _, x_inv = ext.fp8_cast(x2, False, True, need_xt, B.POISON_OUTPUTS)
        y = torch._scaled_mm(x8, w8.data.t(), x_inv, w8.inv_scale, bias=bias, out_dtype=x.dtype,
                             use_fast_accum=True)
        ctx.save_for_backward(x8_t, x_inv, w8.data_t, w8.inv_scale)
        ctx.x_shape, ctx.bias_dtype = x.shape, None if bias is None else bias.dtype
        ctx.ext = ext
        return y.view(*x.shape[:-1], N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x8_t, x_inv, w8_t, w_inv = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        dy2 = _aligned(dy.reshape(-1, dy.shape[-1]))
        dx = dw = db = None
        if need_db:
            db = bias_grad(dy2).to(ctx.bias_dtype)
        if need_dx or need_dw:
            g8, g8_t, _, g_inv = ctx.ext.fp8_cast(dy2, True, need_dx, need_dw, B.POISON_OUTPUTS)
        if need_dx:
            dx = torch._scaled_mm(g8, w8_t.t(), g_inv, w_inv, out_dtype=dy.dtype).view(ctx.x_shape)
        if need_dw:
            dw = torch._scaled_mm(g8_t, x8_t.t(), g_inv, x_inv, out_dtype=dy.dtype)
        return dx, dw, None, db, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_fp8: Optional[Fp8Weight] = None,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight.T (+ bias) with its forward and backward GEMMs in fp8 (torchao's tensorwise recipe, bit for bit;
    the bias in the GEMM's epilogue: see the module docstring). weight_fp8: the weight's copies made earlier this
    optimizer step (`Fp8Weights.get`); None casts it now."""
    if not supports(x, weight):
        raise KernelError(f"fp8_linear: takes bf16 x [..., K] and weight [N, K] with K, N and the token count "
                          f"multiples of 16 on a device with neox's kernels; got x {x.dtype} {tuple(x.shape)} on "
                          f"{x.device}, weight {weight.dtype} {tuple(weight.shape)} on {weight.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],) or bias.device != x.device:
            raise KernelError(f"fp8_linear: bias must be [{weight.shape[0]}] on {x.device}, got "
                              f"{tuple(bias.shape)} on {bias.device}")
        bias = bias.to(x.dtype)  # the epilogue adds x's dtype; autograd casts the gradient back
    w8 = cast_weight(weight) if weight_fp8 is None else weight_fp8
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, weight, bias)):
        x8, _, _, x_inv = fp8_cast(x.reshape(-1, x.shape[-1]))  # inference: no node, no saved xᵀ
        y = torch._scaled_mm(x8, w8.data.t(), x_inv, w8.inv_scale, bias=bias, out_dtype=x.dtype,
                             use_fast_accum=True)
        return y.view(*x.shape[:-1], weight.shape[0])
    return _Fp8Linear.apply(x, weight, w8, bias, B.extension(x.device.type)[0])


class Fp8Weights:
    """Each weight's fp8 copies, made once and reused until `clear()` (the trainer clears before each optimizer
    step). A weight whose storage or version changed since its copy (an in-place update) is cast again; an update
    through .data does not bump the version, hence the clear. `casts` counts the casts made (tests)."""

    def __init__(self) -> None:
        self._copies: Dict[int, Tuple[torch.Tensor, Tuple[int, int], Fp8Weight]] = {}
        self.casts = 0

    def get(self, weight: torch.Tensor) -> Fp8Weight:
        key = (weight.data_ptr(), weight._version)
        held = self._copies.get(id(weight))
        if held is None or held[0] is not weight or held[1] != key:  # the same tensor (not a dead one's id), unchanged
            held = self._copies[id(weight)] = (weight, key, cast_weight(weight))
            self.casts += 1
        return held[2]

    def clear(self) -> None:
        self._copies.clear()
