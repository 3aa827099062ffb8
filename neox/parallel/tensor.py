"""Tensor (and sequence) parallelism, applied to the model from outside.

`TP_PLAN` says, per model class, which child is sharded how; `apply_tensor_parallel` walks any
module tree (a `GPT`, or a pipeline stage built from the same layer classes) and swaps those
children for sharded ones, sliced from the weights already there, so a TP model starts from
exactly the weights of the TP=1 model built with the same seed.

Styles:
  colwise  nn.Linear rows (outputs) split; input replicated (or sequence-gathered), output sharded
  rowwise  nn.Linear columns (inputs) split; partial outputs all-reduced (or reduce-scattered)
  vocab    nn.Embedding rows split by vocab range; lookups outside the range give 0, then all-reduce

The model's own layouts make contiguous shards meaningful: qkv rows are grouped per kv group
([q..., k, v]) so a shard holds whole GQA groups, and SwiGLU's fc_in rows are (gate, up) pairs.
The head stays vocab-sharded (no gather): the loss is `vocab_parallel_cross_entropy`.

Sequence parallelism (Korthikanti et al.): between a rowwise output and the next colwise input
(norms, dropout, residual adds) activations are split along the sequence instead of replicated.
The edges become reduce-scatter (rowwise out) and all-gather (colwise in); norm parameters then
see only their tokens, so their gradients are summed over the TP group (`SequenceParallelNorm`);
a block's such parameters enter the TP region together (`SequenceParallelParams`): one all-reduce
per block in backward, not one per tensor.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from neox.config.layout import check_split
from neox.errors import ConfigError
from neox.model.gpt import MLP, Block, CausalSelfAttention, Embedding, FinalNorm, GPTConfig, Head
from neox.parallel.comm import (SEQ_DIM, TOKEN_DIM, all_gather_no_grad, copy_to_tp, copy_to_tp_linear, copy_to_tp_many,
                                gather_from_sp, gather_from_sp_linear, reduce_from_tp, reduce_scatter_to_sp,
                                scatter_to_sp)
from neox.parallel.overlap import DeferredReduce, overlapping
from neox.parallel.random import TPDropout, TPRandom
from neox.parallel.topology import Topology

# The declarative plan: class -> {child attribute: style}.
TP_PLAN: Dict[type, Dict[str, str]] = {
    CausalSelfAttention: {"qkv": "colwise", "proj": "rowwise"},
    MLP: {"fc_in": "colwise", "fc_out": "rowwise"},
    Embedding: {"tok": "vocab"},
    Head: {"proj": "colwise"},
}

# Which dimension of each parameter a style splits (None: replicated on every TP rank).
_STYLE_DIMS: Dict[str, Dict[str, Optional[int]]] = {
    "colwise": {"weight": 0, "bias": 0},
    "rowwise": {"weight": 1, "bias": None},
    "vocab": {"weight": 0},
}


def _mark_sharded(p: nn.Parameter, dim: int) -> nn.Parameter:
    # DeepSpeed's is_model_parallel_parameter reads `tensor_model_parallel` (or `model_parallel`):
    # marked params count in every TP rank's gradient norm, unmarked ones only on tp_rank 0.
    p.tensor_model_parallel = True
    p.partition_dim = dim
    return p


def _shard(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    return t.detach().chunk(size, dim=dim)[rank].clone()


class ColumnParallelLinear(nn.Module):
    """y[..., shard] = x @ W[shard].T + b[shard] for a replicated x (or, under SP, this rank's tokens
    of x, gathered here).

    The input edge (copy_to_tp, or under SP the all-gather along the sequence) and the matmul are one
    autograd node, so that in backward the edge's collective on dX runs while dW is computed. Under SP,
    attention's input is gathered by the module itself (`_gather_sequence_on_input`): attention reads
    the sequence length from its own input, so that input must already be the full sequence; its
    linear is built with `gathered_by_owner` and has no edge of its own. `sp_dim` is the dimension the SP
    all-gather stacks along (TOKEN_DIM in a token-wise region, see _TOKENWISE)."""

    def __init__(self, linear: nn.Linear, topo: Topology, sequence_parallel: bool, gathered_by_owner: bool = False,
                 sp_dim: int = SEQ_DIM):
        super().__init__()
        r, n = topo.tp_rank, topo.tp_size
        self.topo, self.sequence_parallel, self.sp_dim = topo, sequence_parallel, sp_dim
        self.edge = None if gathered_by_owner else ("gather" if sequence_parallel else "copy")
        self.weight = _mark_sharded(nn.Parameter(_shard(linear.weight, 0, r, n)), 0)
        self.bias = (None if linear.bias is None
                     else _mark_sharded(nn.Parameter(_shard(linear.bias, 0, r, n)), 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The output before the bias (for a fused bias + activation after it)."""
        return self._linear(x, None)

    def local_linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This rank's x @ W.T (+ b), the layer's one matmul (neox.model.fp8 runs it in fp8)."""
        return F.linear(x, self.weight, bias)

    def _linear(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.edge is None:
            return self.local_linear(x, bias)
        group = self.topo.tp_group
        if type(self).local_linear is not ColumnParallelLinear.local_linear or torch.compiler.is_compiling():
            # Two nodes: a swapped matmul (fp8) computes dX and dW in one node, nothing to overlap; and Dynamo
            # cannot trace an async collective (train.compile would split the block at every such layer)
            entered = copy_to_tp(x, group) if self.edge == "copy" else gather_from_sp(x, group, self.sp_dim)
            return self.local_linear(entered, bias)
        if self.edge == "copy":
            return copy_to_tp_linear(x, self.weight, bias, group)
        return gather_from_sp_linear(x, self.weight, bias, group, self.sp_dim)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x[..., shard] @ W[:, shard].T, plus a replicated bias."""

    def __init__(self, linear: nn.Linear, topo: Topology, sequence_parallel: bool, sp_dim: int = SEQ_DIM):
        super().__init__()
        r, n = topo.tp_rank, topo.tp_size
        self.topo, self.sequence_parallel, self.sp_dim = topo, sequence_parallel, sp_dim
        self.weight = _mark_sharded(nn.Parameter(_shard(linear.weight, 1, r, n)), 1)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.sp_params: Optional[SequenceParallelParams] = None  # set by apply_tensor_parallel under SP
        self.defer: Optional[DeferredReduce] = None  # set for one call by an overlapping block (overlap.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local_linear(x)
        if self.sequence_parallel:
            y = reduce_scatter_to_sp(y, self.topo.tp_group, self.sp_dim)
            # The bias is added to this rank's tokens only: sum its gradient over the group.
            return y if self.bias is None else y + _entering_tp(self, self.bias)
        if self.defer is not None:  # the block waits for the sum (and adds the bias) where it needs it
            return self.defer.start(y, self.bias, self.topo.tp_group)
        y = reduce_from_tp(y, self.topo.tp_group)
        return y if self.bias is None else y + self.bias  # after the reduce: added once

    def local_linear(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial x @ W.T, the layer's one matmul (neox.model.fp8 runs it in fp8)."""
        return F.linear(x, self.weight)


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + V/tp) of the table; output all-reduced, so it is replicated."""

    def __init__(self, emb: nn.Embedding, topo: Topology):
        super().__init__()
        r, n = topo.tp_rank, topo.tp_size
        self.topo = topo
        self.vocab_start = r * (emb.num_embeddings // n)
        self.weight = _mark_sharded(nn.Parameter(_shard(emb.weight, 0, r, n)), 0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.topo.tp_group)


class ScatterToSequence(nn.Module):
    """Sequence-parallel entry after the embedding: keep this rank's tokens, then dropout
    with a per-rank mask (the tokens differ across ranks)."""

    def __init__(self, p: float, rng: TPRandom, topo: Topology):
        super().__init__()
        self.topo = topo
        self.drop = TPDropout(p, rng)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(scatter_to_sp(x, self.topo.tp_group))


class SequenceParallelNorm(nn.Module):
    """LayerNorm/RMSNorm on this rank's tokens, sharing the original parameters (same names).
    Each rank's weight gradient covers only its tokens, so the parameters enter through
    `copy_to_tp`: identity forward, gradient summed over the TP group in backward."""

    def __init__(self, norm: nn.Module, topo: Topology):
        super().__init__()
        if not isinstance(norm, (nn.LayerNorm, nn.RMSNorm)):
            raise ConfigError(f"sequence parallelism supports LayerNorm and RMSNorm, not {type(norm).__name__}")
        self.topo, self.is_layernorm = topo, isinstance(norm, nn.LayerNorm)
        self.normalized_shape, self.eps = norm.normalized_shape, norm.eps
        self.weight = norm.weight
        self.bias = norm.bias if self.is_layernorm else None
        self.sp_params: Optional[SequenceParallelParams] = None  # set by apply_tensor_parallel
        for p in self.parameters():
            p.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else _entering_tp(self, self.weight)
        if self.is_layernorm:
            b = None if self.bias is None else _entering_tp(self, self.bias)
            return F.layer_norm(x, self.normalized_shape, w, b, self.eps)
        return F.rms_norm(x, self.normalized_shape, w, self.eps)


class SequenceParallelParams:
    """The replicated parameters that sequence-parallel modules inside one owner (a Block, the final
    norm) use on this rank's tokens only: their gradients must be summed over the TP group. A forward
    pre-hook on the owner passes them all through one `copy_to_tp_many` (one all-reduce per block per
    micro-batch in backward, where one per tensor made six small blocking collectives per block); the
    modules take their entered copy (`_entering_tp`). Outside the owner's call (decode, a module called on
    its own), while compiling or under ZeRO-3, a module falls back to its own `copy_to_tp`: same gradients."""

    def __init__(self, params: List[nn.Parameter], topo: Topology):
        self.params, self.topo = params, topo
        self.entered: Dict[int, torch.Tensor] = {}  # id(param) -> its copy in the current forward

    def enter(self, module: nn.Module, args: tuple) -> None:
        self.entered = {}
        # ZeRO-3 gathers each module's parameters right before its own forward: here they are still partitioned
        zero3 = any(hasattr(p, "ds_id") for p in self.params)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling() and not zero3:
            copies = copy_to_tp_many(tuple(self.params), self.topo.tp_group)
            self.entered = {id(p): c for p, c in zip(self.params, copies)}

    def leave(self, module: nn.Module, args: tuple, out: object) -> None:
        self.entered = {}  # the copies belong to this forward's graph

    def __deepcopy__(self, memo: dict) -> "SequenceParallelParams":
        import copy
        return SequenceParallelParams(copy.deepcopy(self.params, memo), self.topo)


def _entering_tp(module: nn.Module, p: nn.Parameter) -> torch.Tensor:
    """`p` as it enters the TP region in `module`'s forward (see SequenceParallelParams)."""
    got = None if module.sp_params is None else module.sp_params.entered.get(id(p))
    return copy_to_tp(p, module.topo.tp_group) if got is None else got


def _bundle_sequence_parallel_params(owner: nn.Module, topo: Topology) -> None:
    """One SequenceParallelParams for the replicated parameters of `owner`'s sequence-parallel modules: the
    norms' weights and biases, and the row-parallel layers' biases (added to this rank's tokens only)."""
    norms = [m for m in owner.modules() if isinstance(m, SequenceParallelNorm)]
    rows = [m for m in owner.modules() if isinstance(m, RowParallelLinear) and m.sequence_parallel]
    params = [p for p in [*(m.weight for m in norms), *(m.bias for m in norms), *(m.bias for m in rows)]
              if p is not None]
    users = norms + rows
    if not params:
        return
    bundle = SequenceParallelParams(params, topo)
    for m in users:
        m.sp_params = bundle
    owner.register_forward_pre_hook(bundle.enter)
    owner.register_forward_hook(bundle.leave, always_call=True)  # also when checkpointing's recompute stops early


# Sequence parallelism, also declarative: the regions between a rowwise output and the next
# colwise input hold this rank's tokens. Its entry edges (all-gather) are in the colwise layers,
# except for attention, which reads the sequence length from its own input: it gathers its input
# itself (`_SP_GATHER_INPUT`).
SP_PLAN: Dict[type, Dict[str, str]] = {
    Embedding: {"drop": "scatter_dropout"},
    Block: {"ln_attn": "norm", "ln_mlp": "norm", "drop": "dropout"},
    FinalNorm: {"norm": "norm"},
}
_SP_GATHER_INPUT = (CausalSelfAttention,)
# Token-wise regions: each token's output depends on that token alone, so under SP their input is gathered
# with the ranks' tokens stacked along dim 0 and their output reduce-scattered from that order; with
# [batch, seq, features] activations, gathering along the sequence instead costs a strided copy of the
# activations on each side, forward and backward.
_TOKENWISE = (MLP,)


def _sp_dim(owner: nn.Module) -> int:
    return TOKEN_DIM if isinstance(owner, _TOKENWISE) else SEQ_DIM


# style -> builder(owner, child, topo, sp, rng): the sharded module that replaces `owner`'s child
_BUILDERS: Dict[str, Callable[[nn.Module, nn.Module, Topology, bool, TPRandom], nn.Module]] = {
    "colwise": lambda owner, m, topo, sp, rng: ColumnParallelLinear(
        m, topo, sp, gathered_by_owner=sp and isinstance(owner, _SP_GATHER_INPUT), sp_dim=_sp_dim(owner)),
    "rowwise": lambda owner, m, topo, sp, rng: RowParallelLinear(m, topo, sp, sp_dim=_sp_dim(owner)),
    "vocab": lambda owner, m, topo, sp, rng: VocabParallelEmbedding(m, topo),
    "norm": lambda owner, m, topo, sp, rng: SequenceParallelNorm(m, topo),
    "dropout": lambda owner, m, topo, sp, rng: TPDropout(m.p, rng),
    "scatter_dropout": lambda owner, m, topo, sp, rng: ScatterToSequence(m.p, rng, topo),
}


@functools.lru_cache(maxsize=None)
def _on_tp_stream(cls: type) -> type:
    """A subclass of `cls` whose forward runs on the per-rank random stream (attention dropout
    falls on this rank's heads). Swapping `__class__` keeps parameters, state_dict keys, isinstance
    and deepcopy intact, unlike patching `forward` on the instance."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.cfg.attn_dropout == 0.0:  # no random numbers drawn: no fork
            return cls.forward(self, x)
        with self.tp_rng.fork(x.device):
            return cls.forward(self, x)

    return type(f"TP{cls.__name__}", (cls,), {"forward": forward, "__doc__": cls.__doc__})


def _gather_sequence_on_input(group):
    """Forward pre-hook: the sequence-parallel -> TP edge at the input of attention."""
    def hook(module, args):
        return (gather_from_sp(args[0], group),) + tuple(args[1:])
    return hook


def _head_input_edge(topo: Topology, sequence_parallel: bool):
    """Forward hook for the final norm of a tied model: the tied head is a plain F.linear on the
    vocab shard, so its input must enter the TP region the way a colwise input does."""
    def hook(module, args, out):
        return gather_from_sp(out, topo.tp_group) if sequence_parallel else copy_to_tp(out, topo.tp_group)
    return hook


def apply_tensor_parallel(model: nn.Module, topo: Topology, sequence_parallel: bool = False,
                          cfg: Optional[GPTConfig] = None, overlap: bool = False) -> nn.Module:
    """Shard `model` in place following `TP_PLAN`; returns it. `overlap` (without sequence parallelism):
    blocks hide their forward all-reduces behind the other half of the batch (neox.parallel.overlap).

    `model` is a `GPT` or any module tree made of the model's layer classes (a pipeline stage:
    pass `cfg` then, since a stage may hold no module that carries it).
    """
    cfg = cfg or getattr(model, "cfg", None)
    if cfg is None:
        raise ConfigError("apply_tensor_parallel needs the GPTConfig: pass cfg= for a pipeline stage")
    tp = topo.tp_size
    check_split(cfg, tp, sequence_parallel=sequence_parallel)  # the planner's rule, for models built without one
    if any(isinstance(m, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding))
           for m in model.modules()):
        raise ConfigError("apply_tensor_parallel was already applied to this model")
    sp = sequence_parallel and tp > 1
    rng = TPRandom(topo.tp_rank)

    plans = [TP_PLAN] + ([SP_PLAN] if sp else [])
    for module in list(model.modules()):
        for plan in plans:
            for cls, children in plan.items():
                if isinstance(module, cls):
                    for name, style in children.items():
                        setattr(module, name, _BUILDERS[style](module, getattr(module, name), topo, sp, rng))
        if isinstance(module, CausalSelfAttention):
            module.head_offset = topo.tp_rank * (cfg.n_heads // tp)  # ALiBi slopes of our heads
            module.tp_rng = rng
            module.__class__ = _on_tp_stream(type(module))
        if sp and isinstance(module, _SP_GATHER_INPUT):
            module.register_forward_pre_hook(_gather_sequence_on_input(topo.tp_group))
        if isinstance(module, FinalNorm) and cfg.tied_embeddings:
            module.register_forward_hook(_head_input_edge(topo, sp))
        if overlap and not sp and tp > 1 and isinstance(module, Block):
            module.__class__ = overlapping(type(module))
    if sp:
        for module in list(model.modules()):
            if isinstance(module, (Block, FinalNorm)):
                _bundle_sequence_parallel_params(module, topo)
    model.tp_size, model.sequence_parallel = tp, sp  # lets the trainer and checkpointer tell a TP model
    return model


# ---------------------------------------------------------------------------- state dicts
def shard_dims(model: nn.Module) -> Dict[str, Optional[int]]:
    """Parameter name -> the dimension TP splits (None: replicated). Works on the plain model and
    on its TP version (same names), so checkpoints can be resharded without building either."""
    dims: Dict[str, Optional[int]] = {}
    styled: Dict[str, str] = {}
    for mname, module in model.named_modules():
        for cls, children in TP_PLAN.items():
            if isinstance(module, cls):
                for child, style in children.items():
                    styled[f"{mname}.{child}" if mname else child] = style
    for pname, _ in model.named_parameters():
        owner, _, leaf = pname.rpartition(".")
        style = styled.get(owner)
        dims[pname] = None if style is None else _STYLE_DIMS[style].get(leaf)
    return dims


def shard_state_dict(full_sd: Mapping[str, torch.Tensor], dims: Mapping[str, Optional[int]],
                     tp_rank: int, tp_size: int) -> Dict[str, torch.Tensor]:
    """The TP shard `tp_rank` of a full (TP=1) state dict."""
    out = {}
    for k, v in full_sd.items():
        d = dims.get(k)
        if d is not None and v.shape[d] % tp_size:
            raise ConfigError(f"{k}: dim {d} of size {v.shape[d]} does not split into tp={tp_size}")
        out[k] = v if d is None else v.chunk(tp_size, dim=d)[tp_rank].clone()
    return out


def merge_state_dicts(shards: List[Mapping[str, torch.Tensor]],
                      dims: Mapping[str, Optional[int]]) -> Dict[str, torch.Tensor]:
    """Inverse of `shard_state_dict`: the full state dict from all TP ranks' shards, in rank order."""
    return {k: (shards[0][k] if dims.get(k) is None else torch.cat([s[k] for s in shards], dim=dims[k]))
            for k in shards[0]}


def load_full_state_dict(model: nn.Module, full_sd: Mapping[str, torch.Tensor], topo: Topology) -> None:
    """Copy TP=1 weights into a TP model (each rank takes its shard)."""
    model.load_state_dict(shard_state_dict(full_sd, shard_dims(model), topo.tp_rank, topo.tp_size))


def gather_full_state_dict(model: nn.Module, topo: Topology, grads: bool = False) -> Dict[str, torch.Tensor]:
    """Collective: the full parameters (or their gradients) of a TP model, on every TP rank."""
    dims = shard_dims(model)
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p
        if t is None:
            continue
        d = dims[name]
        out[name] = t.detach().clone() if d is None else all_gather_no_grad(t, d, topo.tp_group)
    return out
