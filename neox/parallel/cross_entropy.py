"""Cross-entropy over vocab-sharded logits, without ever gathering the full vocab.

Each TP rank holds logits[..., vocab_start:vocab_start + V/tp]. The loss needs three numbers per
token, each obtained with one all-reduce of a [tokens] vector (never [tokens, vocab]):
the max logit (MAX, for a stable softmax), the target's logit (SUM: exactly one rank owns it)
and the sum of exponentials (SUM). The backward is local: softmax minus one-hot on this shard.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.distributed as dist

from neox import kernels

IGNORE_INDEX = -100  # as F.cross_entropy, which the plain `cross_entropy_loss` uses


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, group: Any) -> torch.Tensor:
        # logits [N, V/tp] fp32, targets [N] global ids; returns the per-token loss [N].
        v_local = logits.shape[-1]
        start = dist.get_rank(group) * v_local
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)

        not_here = (targets < start) | (targets >= start + v_local)
        local_t = (targets - start).masked_fill(not_here, 0)
        target_logit = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(not_here, 0.0)
        dist.all_reduce(target_logit, group=group)

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)

        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_t, not_here)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        softmax, local_t, not_here = ctx.saved_tensors
        grad = softmax  # reused in place: saved tensors are not needed after backward
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -(~not_here).to(grad.dtype).unsqueeze(-1))
        return grad * g.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, group: Any,
                                 ignore_index: int = IGNORE_INDEX, impl: str = "reference") -> torch.Tensor:
    """Mean next-token loss in fp32 from vocab-sharded logits [b, s, V/tp]; equal on all TP ranks.

    Matches `neox.model.gpt.cross_entropy_loss` on the gathered logits, including ignore_index. Fused
    (neox.kernels.cross_entropy with the group): no fp32 copy of the shard, gradient in its storage.
    """
    if kernels.fuses("cross_entropy", impl, logits.device):
        vocab_start = dist.get_rank(group) * logits.shape[-1]
        return kernels.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index, group=group,
                                     vocab_start=vocab_start, impl=impl)
    logits = logits.flatten(0, -2).float()
    targets = targets.flatten()
    valid = targets != ignore_index
    per_token = _VocabParallelCrossEntropy.apply(logits, targets.masked_fill(~valid, 0), group)
    per_token = per_token * valid
    return per_token.sum() / valid.sum().clamp(min=1)


def make_loss_fn(tp_group: Any, impl: str = "reference") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The trainer's loss under TP: `loss_fn(logits, targets)` with vocab-sharded logits."""
    return functools.partial(vocab_parallel_cross_entropy, group=tp_group, impl=impl)
