"""Cross-entropy over (b)f16 logits without an fp32 copy, vocab-parallel aware, gradient in place.

The fused path reads each row of logits once in its own dtype and keeps three fp32 numbers per row:
the local max m, the local sum s = sum exp(x - m) and the target logit t (0 when the target is in
another rank's vocab shard). With a process group (vocab-parallel logits, this rank holding columns
[vocab_start, vocab_start + V)), m is all-reduced with MAX, then (s rescaled to the global max, t) with
one SUM: two small all-reduces of N floats. loss = mean over non-ignored rows of m + log(s) - t.

Backward writes d loss / d logits INTO THE LOGITS TENSOR: after backward, the logits hold their
gradient. Nothing else may need the logits' values after the loss (the version counter is bumped, so
autograd raises if some other op saved them). The reference (upcast + F.cross_entropy, or for a vocab
shard the same statistics in fp32, all-reduced over the group) materializes fp32 logits; it is what the
fused path is tested against, and the trainer's loss wherever the fused one does not run.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from neox.errors import KernelError

from . import _backend as B


def _row_stats_allreduce(m: torch.Tensor, s: torch.Tensor, t: torch.Tensor, group) -> tuple[torch.Tensor, ...]:
    """Combine per-shard (max, sum-exp, target logit) into global ones over `group`."""
    gm = m.clone()
    dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=group)
    st = torch.stack((s * torch.exp(m - gm), t))  # rescale each shard's sum to the global max
    dist.all_reduce(st, op=dist.ReduceOp.SUM, group=group)
    return gm, st[0], st[1]


class _ShardedCrossEntropy(torch.autograd.Function):
    """The reference over a vocab shard: per-token loss [N] from fp32 logits [N, V] holding vocab ids
    [vocab_start, vocab_start + V), targets [N] global ids. With a group, the three row statistics
    (max, target logit, sum of exponentials) are each one all-reduce of N floats, never [N, vocab];
    the backward is local: softmax minus one-hot on this shard."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, group) -> torch.Tensor:
        v_local = logits.shape[-1]
        logits_max = logits.max(dim=-1).values
        if group is not None:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)

        not_here = (targets < vocab_start) | (targets >= vocab_start + v_local)
        local_t = (targets - vocab_start).masked_fill(not_here, 0)
        # 0 where another shard holds the target (as the fused kernel): with a group the sum is the target's logit
        target_logit = logits.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(not_here, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if group is not None:
            dist.all_reduce(target_logit, group=group)
            dist.all_reduce(sum_exp, group=group)

        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_t, not_here)
        return sum_exp.log() - (target_logit - logits_max)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        softmax, local_t, not_here = ctx.saved_tensors
        grad = softmax  # reused in place: saved tensors are not needed after backward
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -(~not_here).to(grad.dtype).unsqueeze(-1))
        return grad * g.unsqueeze(-1), None, None, None


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                            group=None, vocab_start: int = 0) -> torch.Tensor:
    """The loss in fp32: F.cross_entropy for whole logits, `_ShardedCrossEntropy` for a vocab shard (the
    trainer's loss under tensor parallelism, neox.parallel.vocab_parallel_cross_entropy)."""
    V = logits.shape[-1]
    x = logits.reshape(-1, V).float()
    t = targets.reshape(-1)
    if group is None and vocab_start == 0:
        return F.cross_entropy(x, t, ignore_index=ignore_index)
    valid = t != ignore_index
    per_token = _ShardedCrossEntropy.apply(x, t.masked_fill(~valid, 0), vocab_start, group)
    return (per_token * valid).sum() / valid.sum().clamp(min=1)


class _CrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, logits, targets, ignore_index: int, group, vocab_start: int):
        V = logits.shape[-1]
        x, t = logits.view(-1, V), targets.reshape(-1)
        N = x.shape[0]
        m = B.empty((N,), torch.float32, x.device)
        s = B.empty((N,), torch.float32, x.device)
        tl = B.empty((N,), torch.float32, x.device)
        ext.cross_entropy_forward(x, t, m, s, tl, vocab_start, ignore_index)
        if group is not None:
            m, s, tl = _row_stats_allreduce(m, s, tl, group)
        lse = m + torch.log(s)
        valid = t != ignore_index
        n_valid = valid.sum()
        loss = torch.where(valid, lse - tl, torch.zeros_like(lse)).sum() / n_valid
        ctx.save_for_backward(x, t, lse, n_valid)
        ctx.ext, ctx.ignore_index, ctx.vocab_start, ctx.shape, ctx.used = ext, ignore_index, vocab_start, logits.shape, False
        return loss

    @staticmethod
    def backward(ctx, dloss):
        if ctx.used:
            raise KernelError("cross_entropy: backward ran twice, but the first one overwrote the logits with "
                              "their gradient; use impl='reference' to backprop through the loss twice")
        ctx.used = True
        x, t, lse, n_valid = ctx.saved_tensors
        gscale = (dloss.float() / n_valid).reshape(1).contiguous()
        ctx.ext.cross_entropy_backward(x, t, lse, gscale, ctx.vocab_start, ctx.ignore_index)
        torch.autograd.graph.increment_version(x)  # the logits were overwritten in place
        return None, x.view(ctx.shape), None, None, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, group=None,
                  vocab_start: int = 0, impl: str = "auto") -> torch.Tensor:
    """Mean cross-entropy of logits [..., V] against targets [...] (int64), ignoring `ignore_index`.

    group / vocab_start: for vocab-parallel logits, the process group that holds the other shards and
    this shard's first vocab id. The fused path overwrites `logits` with their gradient in backward.
    """
    if logits.dim() < 1 or targets.shape != logits.shape[:-1]:
        raise KernelError(f"cross_entropy: targets {tuple(targets.shape)} must be logits {tuple(logits.shape)} "
                          "without the last dim")
    if targets.dtype not in (torch.int64, torch.int32):
        raise KernelError(f"cross_entropy: targets must be integer ids, got {targets.dtype}")
    ext = B.fused_extension("cross_entropy", impl, logits, targets)
    if ext is None:
        return cross_entropy_reference(logits, targets.long(), ignore_index, group, vocab_start)
    return _CrossEntropyFn.apply(ext, logits.contiguous(), targets.long().contiguous(), int(ignore_index), group,
                                 int(vocab_start))
