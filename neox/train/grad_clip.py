"""Gradient clipping for every engine the trainer builds, with the norm it reports.

In plain fp32 without ZeRO, DeepSpeed clips but drops the norm it computed (`get_global_grad_norm()`
returns None), and under pipeline parallelism it computes that norm wrongly. `install_grad_clipping`
replaces the engine's fp32 clipping with `clip_grad_norm_`, which is right for pipe x tensor parallel
models and keeps the norm. ZeRO-1/2/3, bf16 and fp16 engines clip correctly themselves.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, mpu: Any) -> torch.Tensor:
    """Clip gradients to a global L2 norm over a pipe x tensor parallel model; returns the norm.

    DeepSpeed's fp32 (ZeRO-0) clipping counts unsharded parameters only on the rank with
    `get_model_parallel_rank() == 0`, i.e. on the first pipeline stage only, and counts the
    pipeline's second copy of a tied weight again. Here, as in DeepSpeed's ZeRO and bf16 norms:
    a tied copy marked `ds_pipe_replicated` is skipped, an unsharded parameter counts on tensor
    rank 0 only, and the squares are summed over the model-parallel (pipe x tensor) group."""
    from deepspeed.runtime.utils import is_model_parallel_parameter
    from deepspeed.utils.bwc import bwc_tensor_model_parallel_rank

    params = [p for p in parameters if p.grad is not None]
    tp_rank = bwc_tensor_model_parallel_rank(mpu)
    device = params[0].grad.device if params else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for p in params:
        if getattr(p, "ds_pipe_replicated", False) or (tp_rank > 0 and not is_model_parallel_parameter(p)):
            continue
        squares += p.grad.detach().float().pow(2).sum()
    if mpu is not None:
        torch.distributed.all_reduce(squares, group=mpu.get_model_parallel_group())
    norm = squares.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.detach().mul_(coef.to(p.grad.dtype))
    return norm


def install_grad_clipping(engine: Any) -> None:
    """Make a ZeRO-0 fp32 engine clip with `clip_grad_norm_` and report the norm through
    `engine.get_global_grad_norm()` (ZeRO-1, bf16 and fp16 engines clip correctly themselves)."""
    def clip_fp32_gradients() -> None:
        engine._global_grad_norm = clip_grad_norm_(engine.module.parameters(), engine.gradient_clipping(),
                                                   engine.mpu).item()

    engine.clip_fp32_gradients = clip_fp32_gradients
