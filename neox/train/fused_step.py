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
  `torch._foreach_norm` over the bf16 gradients (fp32 accumulation); its `.item()` is the step's one
  host sync, which DeepSpeed needs anyway for `_global_grad_norm`;
- a non-finite norm skips the step exactly as DeepSpeed does (`_skip_invalid_grad_norm`), and
  `SkipNonFiniteAdamW.skip_events` counts it; AdamW's own finite check is not run again;
- DeepSpeed's clip factor, handed to torch's fused AdamW as `grad_scale` (its kernel divides the
  gradient as it reads it) or, for an unfused AdamW, one `_foreach_mul_`; only when it is not 1;
- the fp32 gradients live only during the step, a chunk of tensors at a time (`CHUNK_ELEMENTS`, 1 GiB of
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


def global_grad_norm(params: List[torch.Tensor], mpu: Optional[Any]) -> float:
    """The L2 norm of the gradients of `params` that count (norm_counts) over the model-parallel
    group: one foreach norm in fp32, one all-reduce, one host sync. inf or nan if any is not finite."""
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
    return math.sqrt(squares.item())  # sqrt(inf) is inf, sqrt(nan) nan


@torch.no_grad()
def fused_step(self: Any, closure: None = None) -> bool:
    """`FP16_UnfusedOptimizer.step` (bf16, AdamW) with the passes merged; returns the overflow flag."""
    inner = self.optimizer
    masters = [m for group in self.fp32_groups for m in group]
    params = [p for group in self.fp16_groups for p in group]
    norm = global_grad_norm(params, self.mpu)
    if not math.isfinite(norm):
        if isinstance(inner, SkipNonFiniteAdamW):
            inner.skip_events += 1  # the trainer's count of skipped steps (max_nonfinite_steps)
        return self._skip_invalid_grad_norm()  # grads None, norm inf, overflow True
    self.overflow = False
    self._global_grad_norm = norm
    self._update_scale(False)
    scale = self.unscale_and_clip_grads(norm, apply_scale=False)  # DeepSpeed's own clip arithmetic

    fused = all(group.get("fused") for group in inner.param_groups)
    if scale != 1.0 and fused:  # the kernel divides each gradient by it as it reads it: no pass of its own
        inner.grad_scale = torch.full((), scale, dtype=torch.float32, device=masters[0].device)
    try:
        for part in chunks([m.numel() for m in masters], getattr(self, "fused_step_chunk", CHUNK_ELEMENTS)):
            _adamw_chunk(inner, [params[i] for i in part], [masters[i] for i in part], scale, fused)
    finally:
        inner.__dict__.pop("grad_scale", None)
    return self.overflow


def _adamw_chunk(inner: Any, params: List[torch.Tensor], masters: List[torch.Tensor], scale: float,
                 fused: bool) -> None:
    """AdamW on these masters (fp32 copies of their bf16 gradients, made here and freed after), then their bf16
    weights. Only they have gradients during the call, so AdamW steps only them."""
    with_grad = [i for i, p in enumerate(params) if p.grad is not None]
    for i, m in enumerate(masters):
        m.grad = torch.empty_like(m) if params[i].grad is not None else torch.zeros_like(m)
    if with_grad:
        torch._foreach_copy_([masters[i].grad for i in with_grad], [params[i].grad for i in with_grad])
    if scale != 1.0 and not fused:
        torch._foreach_mul_([m.grad for m in masters], 1.0 / scale)
    try:
        torch.optim.AdamW.step(inner)  # not SkipNonFiniteAdamW.step: the norm above decided
    finally:
        for m in masters:
            m.grad = None
    torch._foreach_copy_(params, masters)


def install_fused_step(engine: Any) -> bool:
    """Give a bf16 engine's `FP16_UnfusedOptimizer` (ZeRO-0, no pipeline) the fused step; returns
    whether it did. fp16 keeps DeepSpeed's step (dynamic loss scaling), as does any optimizer that
    is not torch's AdamW."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    opt = engine.optimizer
    if not (isinstance(opt, FP16_UnfusedOptimizer) and opt.low_precision_dtype == torch.bfloat16
            and not opt.fused_lamb_legacy and isinstance(opt.optimizer, torch.optim.AdamW)):
        return False
    opt.step = types.MethodType(fused_step, opt)
    return True
