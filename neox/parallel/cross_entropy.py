"""The trainer's loss under tensor parallelism: cross-entropy over vocab-sharded logits, never gathered.

Each TP rank holds logits[..., vocab_start:vocab_start + V/tp]. The loss needs three numbers per
token, each one all-reduce of a [tokens] vector (never [tokens, vocab]): the max logit, the target's
logit and the sum of exponentials. The math, fused and reference, is `neox.kernels.cross_entropy`'s;
this module gives it the rank's vocab range and the loss function signature the trainer calls.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.distributed as dist

from neox import kernels

IGNORE_INDEX = -100  # as F.cross_entropy, which the plain `cross_entropy_loss` uses


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, group: Any,
                                 ignore_index: int = IGNORE_INDEX, impl: str = "reference") -> torch.Tensor:
    """Mean next-token loss in fp32 from vocab-sharded logits [b, s, V/tp]; equal on all TP ranks.

    Matches `neox.model.gpt.cross_entropy_loss` on the gathered logits, including ignore_index. The math
    is neox.kernels.cross_entropy's: fused, no fp32 copy of the shard and the gradient in its storage;
    reference, fp32 with the same three all-reduced row statistics.
    """
    vocab_start = dist.get_rank(group) * logits.shape[-1]
    return kernels.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index, group=group,
                                 vocab_start=vocab_start, impl=impl)


def make_loss_fn(tp_group: Any, impl: str = "reference") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The trainer's loss under TP: `loss_fn(logits, targets)` with vocab-sharded logits."""
    return functools.partial(vocab_parallel_cross_entropy, group=tp_group, impl=impl)
