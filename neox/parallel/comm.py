"""Autograd-aware collectives at the edges of tensor-parallel regions.

Each function is a pair (forward collective, backward collective) that are transposes of each
other, so a sharded layer gets correct gradients without the model knowing about sharding:

    copy_to_tp           identity        | all-reduce       (replicated input enters a TP region)
    reduce_from_tp       all-reduce      | identity         (partial sums leave a TP region)
    gather_from_tp       all-gather last | split last       (sharded features -> full features)
    scatter_to_tp        split last      | all-gather last
    gather_from_sp       all-gather seq  | reduce-scatter   (sequence-parallel -> TP region)
    reduce_scatter_to_sp reduce-scatter  | all-gather seq   (TP region -> sequence-parallel)
                         (both also along dim 0, TOKEN_DIM: the ranks' tokens stacked, for token-wise
                         regions that never need the sequence in order; no copy on either side)
    scatter_to_sp        split seq       | all-gather seq

    copy_to_tp_many      copy_to_tp of several tensors, their gradients all-reduced as one buffer

    copy_to_tp_linear    copy_to_tp, then this rank's linear, as one node whose backward overlaps
                         the input gradient's all-reduce with the weight gradient's matmul
    gather_from_sp_linear  gather_from_sp, then the linear, likewise (the reduce-scatter overlapped)

Activations are [batch, seq, features], so the sequence dimension is 1. With a group of size 1
every function is the identity (no communication), which keeps TP=1 free.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from neox.errors import ConfigError

Group = Optional[dist.ProcessGroup]

SEQ_DIM = 1
TOKEN_DIM = 0  # [tp * batch, seq / tp, features]: rank r's tokens are rows r*batch..(r+1)*batch-1

# torch 2.14 renamed the tensor-in/tensor-out collectives (the old names warn); older torch
# (the GPU machine has 2.11) only has the old ones.
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _size(group: Group) -> int:
    return dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    # The collective stacks the ranks' blocks along dim 0 (rank-major; gloo wants the stack shaped
    # [n * x.shape[0], ...]); one copy then puts each block in place along `dim` (none for dim 0).
    x = x.contiguous()
    out = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_into(out, x, group=group)
    dim = dim % x.dim()
    return out.unflatten(0, (n, x.shape[0])).movedim(0, dim).flatten(dim, dim + 1)


def _split(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:  # uneven chunks would make the matching all-gather fail or hang
        raise ConfigError(f"cannot split dim {dim} of size {x.shape[dim]} over {n} tensor-parallel ranks; "
                          f"with sequence parallelism the sequence length must be divisible by tp")
    return x.chunk(n, dim=dim)[dist.get_rank(group)].contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    out, _ = _start_reduce_scatter(x, dim, group, async_op=False)
    return out


def _start_reduce_scatter(x: torch.Tensor, dim: int, group: Group,
                          async_op: bool) -> Tuple[torch.Tensor, Optional[dist.Work]]:
    """Reduce-scatter along `dim`: (this rank's block, the work or None; the block is complete once the
    work is waited on)."""
    n = _size(group)
    dim = dim % x.dim()
    # One copy makes the ranks' blocks along `dim` a stack [n, *block] (none for dim 0), which the
    # collective takes as is and scatters straight into this rank's block.
    stacked = x.unflatten(dim, (n, x.shape[dim] // n)).movedim(dim, 0).contiguous()
    out = torch.empty(stacked.shape[1:], dtype=x.dtype, device=x.device)
    return out, _reduce_scatter_into(out, stacked.flatten(0, 1), group=group, async_op=async_op)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone(), ctx.group), None  # clone: autograd may share g


class _CopyToTPMany(torch.autograd.Function):
    """copy_to_tp of each input; backward: one all-reduce of all their gradients, flattened together per
    dtype. The sums are those of one all-reduce per tensor, element for element."""

    @staticmethod
    def forward(ctx, group, *xs):
        ctx.group = group
        ctx.meta = [(x.shape, x.dtype, x.device) for x in xs]
        return xs

    @staticmethod
    def backward(ctx, *grads):
        grads = [torch.zeros(shape, dtype=dtype, device=device) if g is None else g
                 for g, (shape, dtype, device) in zip(grads, ctx.meta)]
        out: list = [None] * len(grads)
        for dtype in dict.fromkeys(g.dtype for g in grads):
            idx = [i for i, g in enumerate(grads) if g.dtype == dtype]
            flat = _all_reduce(torch.cat([grads[i].reshape(-1) for i in idx]), ctx.group)  # cat: a fresh buffer
            for i, piece in zip(idx, flat.split([grads[i].numel() for i in idx])):
                out[i] = piece.view(grads[i].shape).clone()  # a storage of its own, as AccumulateGrad may keep it
        return (None, *out)


class _EdgeLinear(torch.autograd.Function):
    """`F.linear(copy_to_tp(x), weight, bias)` (dim None) or `F.linear(gather_from_sp(x, dim=dim), weight, bias)`
    in one node. Split in two, the input gradient's all-reduce (reduce-scatter) waits for both
    of the linear's backward matmuls; here it starts right after dX and runs while dW and db are computed.

    The backward runs the matmuls autograd runs for F.linear on a contiguous input (flattened to 2-d:
    dX = dY @ W, dW = dY^T @ X, db = dY summed over rows) and the same collectives, so the gradients are
    bitwise those of the two-node path (tests/parallel/test_tp_overlap.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group, dim: Optional[int]):
        # the linear's input as F.linear would save it: this rank's (contiguous), or the gathered sequence
        full = x.contiguous() if dim is None else _all_gather(x, dim, group)
        ctx.save_for_backward(full, weight)
        ctx.group, ctx.has_bias, ctx.dim = group, bias is not None, dim
        return F.linear(full, weight, bias)

    @staticmethod
    def backward(ctx, g):
        full, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        dx = work = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = g2.mm(weight).view(full.shape)  # fresh: reduced in place, nobody else holds it
            if ctx.dim is not None:
                dx, work = _start_reduce_scatter(dx, ctx.dim, ctx.group, async_op=True)
            else:
                work = dist.all_reduce(dx, group=ctx.group, async_op=True)
        if ctx.needs_input_grad[1]:
            dw = g2.t().mm(full.reshape(-1, full.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.sum(0)
        if work is not None:
            work.wait()
        return dx, dw, db, None, None


def _reducible_in_place(x: torch.Tensor) -> bool:
    """Whether a partial sum can be all-reduced where it is: not a view (autograd forbids modifying the view
    output of a custom Function in place: fp8's matmul), contiguous, and not in compiled code (Dynamo cannot
    trace a dirty input through the collective)."""
    return not (torch.compiler.is_compiling() or x._is_view() or not x.is_contiguous())


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        # Reduced in place (callers pass a partial sum only they made, that nothing else reads: a row-parallel
        # linear's or the vocab-parallel embedding's fresh output), which saves a copy of the activations;
        # copied first where that cannot be.
        if not _reducible_in_place(x):
            return _all_reduce(x.clone(), group)
        ctx.mark_dirty(x)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return _split(g, -1, ctx.group), None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, -1, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    # The consumer is a column-parallel linear: each rank's input gradient is a partial sum
    # over its output shard, so the transpose of the all-gather is a reduce-scatter.
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.dim, ctx.group), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.dim, ctx.group), None, None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, SEQ_DIM, ctx.group), None


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _CopyToTP.apply(x, group) if _size(group) > 1 else x


def copy_to_tp_many(xs: Tuple[torch.Tensor, ...], group: Group) -> Tuple[torch.Tensor, ...]:
    """copy_to_tp of each of `xs`, with one all-reduce in backward for all of them."""
    return _CopyToTPMany.apply(group, *xs) if _size(group) > 1 and xs else tuple(xs)


def copy_to_tp_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      group: Group) -> torch.Tensor:
    """`F.linear(copy_to_tp(x, group), weight, bias)`, with the backward's all-reduce overlapped."""
    return _EdgeLinear.apply(x, weight, bias, group, None) if _size(group) > 1 else F.linear(x, weight, bias)


def gather_from_sp_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          group: Group, dim: int = SEQ_DIM) -> torch.Tensor:
    """`F.linear(gather_from_sp(x, group, dim), weight, bias)`, with the backward's reduce-scatter overlapped."""
    return _EdgeLinear.apply(x, weight, bias, group, dim) if _size(group) > 1 else F.linear(x, weight, bias)


class PendingReduce:
    """An all-reduce of partial sums started in forward (`start_reduce_from_tp`), finished by `wait_reduce`."""

    def __init__(self) -> None:
        self.work: Optional[dist.Work] = None


class _StartReduceFromTP(torch.autograd.Function):
    """reduce_from_tp's forward, started and not waited for: the result is the sum only after `wait_reduce`.
    Nothing may read it before: the collective writes it on its own stream meanwhile."""

    @staticmethod
    def forward(ctx, x, group, pending):
        if _reducible_in_place(x):  # as _ReduceFromTP
            ctx.mark_dirty(x)
        else:
            x = x.contiguous().clone()
        pending.work = dist.all_reduce(x, group=group, async_op=True)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class _WaitReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pending):
        pending.work.wait()  # on a GPU the current stream waits for the collective; the host goes on
        pending.work = None
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def start_reduce_from_tp(x: torch.Tensor, group: Group, pending: PendingReduce) -> torch.Tensor:
    """reduce_from_tp, asynchronous: the returned tensor holds the sum once `wait_reduce` has run on it."""
    return _StartReduceFromTP.apply(x, group, pending) if _size(group) > 1 else x


def wait_reduce(x: torch.Tensor, pending: PendingReduce) -> torch.Tensor:
    return _WaitReduce.apply(x, pending) if pending.work is not None else x


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group) if _size(group) > 1 else x


def gather_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _GatherFromTP.apply(x, group) if _size(group) > 1 else x


def scatter_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ScatterToTP.apply(x, group) if _size(group) > 1 else x


def gather_from_sp(x: torch.Tensor, group: Group, dim: int = SEQ_DIM) -> torch.Tensor:
    return _GatherFromSP.apply(x, group, dim) if _size(group) > 1 else x


def reduce_scatter_to_sp(x: torch.Tensor, group: Group, dim: int = SEQ_DIM) -> torch.Tensor:
    return _ReduceScatterToSP.apply(x, group, dim) if _size(group) > 1 else x


def scatter_to_sp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ScatterToSP.apply(x, group) if _size(group) > 1 else x


def all_gather_no_grad(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Plain all-gather along `dim` for tests, evaluation and checkpoint resharding."""
    return _all_gather(x.detach(), dim, group)
