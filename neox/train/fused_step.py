"""A bf16 optimizer step that reads every gradient once for the norm and once for AdamW.

DeepSpeed wraps our AdamW in `FP16_UnfusedOptimizer` for bf16 (and fp8) at ZeRO-0 without pipeline
parallelism. Its step walks the ~290 parameter tensors of a 1.4B model one by one: an inf/NaN test
per tensor whose truthiness is a host sync, an fp32 copy of each gradient to take its norm, another
fp32 copy for AdamW, a multiply by 1/scale even when it is 1, AdamW, then a copy back per tensor;
and `SkipNonFiniteAdamW` reads all gradients once more, with another sync. `install_fused_step`
replaces that step on the engine's optimizer instance with one that keeps its state layout
(`fp32_groups`, `fp16_groups`, the inner optimizer's state: checkpoints and resharding are
unchanged) and its semantics:

- the global norm as DeepSpeed's `get_weight_norm` defines it under tensor parallelism, from one
  `torch._foreach_norm` over the bf16 gradients (fp32 accumulation);
- a non-finite norm skips the step exactly as DeepSpeed does (`_skip_invalid_grad_norm`), and
  `SkipNonFiniteAdamW.skip_events` counts it; AdamW's own finite check is not run again;
- DeepSpeed's clip factor, handed to torch's fused AdamW as `grad_scale` (its kernel divides the
  gradient as it reads it) or, for an unfused AdamW, one `_foreach_mul_`;
- with torch's fused AdamW (every GPU run) the clip factor and the skip are decided on the device: the
  factor is DeepSpeed's arithmetic in float64 there (the same IEEE operations as its host code, so the
  same number), the skip is the kernel's `found_inf`. AdamW and the weight copies are queued before the
  host reads the norm (the step's one host sync, which the engine needs for its overflow flag, the lr
  schedule and `_global_grad_norm`), so the GPU has the whole update to run while the host goes on to
  the next forward. Reading the norm first left the GPU idle while the host launched the update and
  the first forward kernels (15 ms of a 1,027 ms step at 1.4B on an H200, session 18's profile);
- where the "adamw" op's kernel is on (CUDA, `model.kernel_ops.adamw`), AdamW reads the bf16 gradients
  straight into the fp32 state and writes the bf16 weights in the same pass (`neox.kernels.adamw_bf16_step_`:
  torch's fused AdamW's numbers bit for bit, 28 B per parameter where the path below moves ~40);
- otherwise the fp32 gradients live only during the step, a chunk of tensors at a time (`CHUNK_ELEMENTS`, 1 GiB of
  them, where DeepSpeed's step holds every one at once: 26 GB at 6.7B, the largest allocation of a big
  model's step); AdamW is elementwise, so a chunked step is the whole step bitwise. `_foreach_copy_` writes
  each chunk's bf16 weights.

One difference from DeepSpeed: its unfused step takes the norm over gradient tensors, which carry
no `tensor_model_parallel` mark, so with tp > 1 only tensor rank 0's gradients counted. Here the
marks are read from the parameters, as in DeepSpeed's ZeRO and BF16 optimizers and
`neox.train.grad_clip`.
"""
from __future__ import annotations

import math
import types
from typing import Any, List, Optional

import torch

from neox.train.guards import SkipNonFiniteAdamW

CHUNK_ELEMENTS = 1 << 28  # fp32 gradient elements alive at once in the step (a larger tensor alone)


def chunks(sizes: List[int], limit: int) -> List[range]:
    """Consecutive index ranges whose sizes add up to at most `limit`; a size above it gets a range alone."""
    out, begin, total = [], 0, 0
    for i, n in enumerate(sizes):
        if i > begin and total + n > limit:
            out.append(range(begin, i))
            begin, total = i, 0
        total += n
    if begin < len(sizes):
        out.append(range(begin, len(sizes)))
    return out


def norm_counts(p: torch.Tensor, tp_rank: int) -> bool:
    """Whether p's gradient counts in the global norm on this rank (as in DeepSpeed's get_weight_norm):
    a pipeline's tied copy never, a parameter TP does not shard on tensor rank 0 only."""
    from deepspeed.runtime.utils import is_model_parallel_parameter

    if getattr(p, "ds_pipe_replicated", False):
        return False
    return tp_rank == 0 or is_model_parallel_parameter(p)


def grad_norm_squares(params: List[torch.Tensor], mpu: Optional[Any]) -> torch.Tensor:
    """The squared L2 norm (fp32, on the device, not read) of the gradients of `params` that count
    (norm_counts) over the model-parallel group: one foreach norm in fp32, one all-reduce."""
    from deepspeed.utils.bwc import bwc_tensor_model_parallel_rank

    tp_rank = bwc_tensor_model_parallel_rank(mpu)
    grads = [p.grad for p in params if p.grad is not None and norm_counts(p, tp_rank)]
    device = params[0].device if params else torch.device("cpu")
    if grads:
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)  # fp32 sums over bf16, no fp32 copies
        squares = torch.stack(norms).square().sum()
    else:
        squares = torch.zeros((), dtype=torch.float32, device=device)
    if mpu is not None:
        torch.distributed.all_reduce(squares, group=mpu.get_model_parallel_group())
    return squares


def global_grad_norm(params: List[torch.Tensor], mpu: Optional[Any]) -> float:
    """grad_norm_squares' norm, read on the host (inf or nan if any gradient is not finite)."""
    return math.sqrt(grad_norm_squares(params, mpu).item())  # sqrt(inf) is inf, sqrt(nan) nan


@torch.no_grad()
def fused_step(self: Any, closure: None = None) -> bool:
    """`FP16_UnfusedOptimizer.step` (bf16, AdamW) with the passes merged; returns the overflow flag."""
    inner = self.optimizer
    masters = [m for group in self.fp32_groups for m in group]
    params = [p for group in self.fp16_groups for p in group]
    if all(group.get("fused") for group in inner.param_groups):
        return _queued_step(self, inner, params, masters)
    norm = global_grad_norm(params, self.mpu)
    if not math.isfinite(norm):
        return _skip(self, inner)
    self.overflow = False
    self._global_grad_norm = norm
    self._update_scale(False)
    scale = self.unscale_and_clip_grads(norm, apply_scale=False)  # DeepSpeed's own clip arithmetic
    _adamw_chunks(self, inner, params, masters, 1.0 / scale if scale != 1.0 else 1.0)
    return self.overflow


def _queued_step(self: Any, inner: Any, params: List[torch.Tensor], masters: List[torch.Tensor]) -> bool:
    """The step with torch's fused AdamW: clip factor and skip on the device, the norm read last."""
    norm = grad_norm_squares(params, self.mpu).double().sqrt()
    cur_scale = self.loss_scale_config.cur_scale  # 1 for bf16 (no dynamic loss scale)
    scale = torch.full_like(norm, cur_scale)
    if self.clip_grad > 0.0:  # unscale_and_clip_grads, operation for operation, in float64
        clip = ((norm / cur_scale) + 1e-6) / self.clip_grad
        scale = torch.where(clip > 1, clip * cur_scale, scale)
    grad_scale = scale.float()  # the kernel divides each gradient by it as it reads it
    found_inf = (~torch.isfinite(norm)).float()  # the kernel then changes nothing (steps restored)
    if _bf16_kernel(self, inner, masters[0].device if masters else None):
        _adamw_from_bf16(self, inner, grad_scale, found_inf)
    else:
        inner.grad_scale, inner.found_inf = grad_scale, found_inf
        try:
            _adamw_chunks(self, inner, params, masters, 1.0)
        finally:
            inner.__dict__.pop("grad_scale", None)
            inner.__dict__.pop("found_inf", None)
    value = norm.item()  # the host sync: the update is queued behind it
    if not math.isfinite(value):
        return _skip(self, inner)  # AdamW skipped on the device; the weights were rewritten unchanged
    self.overflow = False
    self._global_grad_norm = value
    self._update_scale(False)
    return self.overflow


def _bf16_kernel(self: Any, inner: Any, device: Optional[torch.device]) -> bool:
    """Whether neox.kernels.adamw_bf16_step_ takes this step: the op on (`adamw_impl`, set at install)
    and built for the device, and AdamW as it implements it (no amsgrad, no maximize)."""
    from neox.kernels import _backend

    impl = getattr(self, "adamw_impl", None)
    return (impl is not None and device is not None and _backend.choose("adamw", impl, device) is not None
            and not any(g.get("amsgrad") or g.get("maximize") for g in inner.param_groups))


def _adamw_from_bf16(self: Any, inner: Any, grad_scale: torch.Tensor, found_inf: torch.Tensor) -> None:
    """AdamW straight from the bf16 gradients into the fp32 state and the bf16 weights (one pass, no fp32
    gradients: 28 B per parameter where the chunks move ~40); torch's fused AdamW's numbers, bit for bit."""
    from neox.kernels.adamw import adamw_bf16_step_, torch_adamw_state

    for group, params16, masters32 in zip(inner.param_groups, self.fp16_groups, self.fp32_groups):
        exp_avgs, exp_avg_sqs, steps = torch_adamw_state(inner, masters32)
        beta1, beta2 = group["betas"]
        adamw_bf16_step_(params16, [p.grad for p in params16], masters32, exp_avgs, exp_avg_sqs, steps,
                         lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"], grad_scale=grad_scale, found_inf=found_inf,
                         impl=self.adamw_impl)


def _skip(self: Any, inner: Any) -> bool:
    if isinstance(inner, SkipNonFiniteAdamW):
        inner.skip_events += 1  # the trainer's count of skipped steps (max_nonfinite_steps)
    return self._skip_invalid_grad_norm()  # grads None, norm inf, overflow True


def _adamw_chunks(self: Any, inner: Any, params: List[torch.Tensor], masters: List[torch.Tensor],
                  multiplier: float) -> None:
    """AdamW over every master, `fused_step_chunk` fp32 gradient elements at a time, each gradient times
    `multiplier` first (DeepSpeed's 1 / clip factor, for an AdamW that takes no grad_scale)."""
    for part in chunks([m.numel() for m in masters], getattr(self, "fused_step_chunk", CHUNK_ELEMENTS)):
        _adamw_chunk(inner, [params[i] for i in part], [masters[i] for i in part], multiplier)


def _adamw_chunk(inner: Any, params: List[torch.Tensor], masters: List[torch.Tensor], multiplier: float) -> None:
    """AdamW on these masters (fp32 copies of their bf16 gradients, made here and freed after), then their bf16
    weights. Only they have gradients during the call, so AdamW steps only them."""
    with_grad = [i for i, p in enumerate(params) if p.grad is not None]
    for i, m in enumerate(masters):
        m.grad = torch.empty_like(m) if params[i].grad is not None else torch.zeros_like(m)
    if with_grad:
        torch._foreach_copy_([masters[i].grad for i in with_grad], [params[i].grad for i in with_grad])
    if multiplier != 1.0:
        torch._foreach_mul_([m.grad for m in masters], multiplier)
    try:
        torch.optim.AdamW.step(inner)  # not SkipNonFiniteAdamW.step: the norm above decided
    finally:
        for m in masters:
            m.grad = None
    torch._foreach_copy_(params, masters)


def install_fused_step(engine: Any, adamw_impl: Optional[str] = None) -> bool:
    """Give a bf16 engine's `FP16_UnfusedOptimizer` (ZeRO-0, no pipeline) the fused step; returns
    whether it did. fp16 keeps DeepSpeed's step (dynamic loss scaling), as does any optimizer that
    is not torch's AdamW. `adamw_impl`: the "adamw" op's impl (model.kernel_ops.adamw or model.kernels);
    where it chooses the kernel, the fused AdamW's update runs in neox.kernels.adamw_bf16_step_."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    opt = engine.optimizer
    if not (isinstance(opt, FP16_UnfusedOptimizer) and opt.low_precision_dtype == torch.bfloat16
            and not opt.fused_lamb_legacy and isinstance(opt.optimizer, torch.optim.AdamW)):
        return False
    opt.step = types.MethodType(fused_step, opt)
    opt.adamw_impl = adamw_impl
    return True
