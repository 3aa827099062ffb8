"""The column-parallel linear's backward overlaps the input gradient's all-reduce (under SP: reduce-scatter)
with the weight gradient (neox.parallel.comm.copy_to_tp_linear, gather_from_sp_linear), and computes bitwise
what the two-node path computes (the edge, then the linear, each its own autograd node: what a swapped matmul
such as fp8, and compiled code, still run). Also: the collectives around TP regions copy no more than needed.

In-process: the order of the backward's calls and the copies, with the collectives replaced by spies.
On two gloo ranks (the folder's shared spawn, conftest.py: two_ranks): the sequence collectives against
torch.cat and a sum; every gradient, bitwise, for the layer alone and for whole tp=2 models (fused bias + GeLU,
activation checkpointing, tied head, SP off and on, two micro-batches accumulated), against the same model with
its column-parallel layers on the two-node path. On two GPUs (-m gpu): the layer over nccl in bf16.
"""
from __future__ import annotations

import copy
import types
from typing import List, Optional

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from neox.model.gpt import GPT, GPTConfig
from neox.parallel import Topology, apply_tensor_parallel, comm, vocab_parallel_cross_entropy
from neox.parallel.tensor import ColumnParallelLinear, RowParallelLinear


class TwoNodeColumnParallelLinear(ColumnParallelLinear):
    """The same layer with its matmul swapped (as neox.model.fp8 swaps it): copy_to_tp, then F.linear."""

    def local_linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.linear(x, self.weight, bias)


def _two_node(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose column-parallel layers run the two-node path."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if type(m) is ColumnParallelLinear:
            m.__class__ = TwoNodeColumnParallelLinear
    return model


# ---------------------------------------------------------------------------------------- the order
class _Calls(TorchDispatchMode):
    """Records each matmul by its output shape."""

    def __init__(self, log: List[str]) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.mm.default:
            self.log.append(f"mm{tuple(out.shape)}")
        return out


def _spy_layer(monkeypatch, log: List[str], bias: bool, sp: bool) -> ColumnParallelLinear:
    """A rank's column-parallel layer (6 -> 8 features, 4 local outputs) of a pretend tp=2 group whose
    collectives are spies (one process: the all-reduce leaves the tensor as it is, the all-gather
    repeats it, the reduce-scatter keeps the first half)."""
    def wait_for(name: str, async_op: bool):
        log.append(f"{name}(async)" if async_op else name)
        return types.SimpleNamespace(wait=lambda: log.append("wait")) if async_op else None

    def all_reduce(t, group=None, async_op=False):
        return wait_for("all_reduce", async_op)

    def all_gather(out, t, group=None, async_op=False):
        out.view(-1).copy_(torch.cat([t.reshape(-1)] * 2))
        return wait_for("all_gather", async_op)

    def reduce_scatter(out, t, group=None, async_op=False):
        out.view(-1).copy_(t.reshape(-1)[:out.numel()])
        return wait_for("reduce_scatter", async_op)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(comm, "_all_gather_into", all_gather)
    monkeypatch.setattr(comm, "_reduce_scatter_into", reduce_scatter)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    topo = types.SimpleNamespace(tp_rank=0, tp_size=2, tp_group=None)
    torch.manual_seed(0)
    return ColumnParallelLinear(nn.Linear(6, 8, bias=bias), topo, sequence_parallel=sp)


def _backward_calls(layer: nn.Module, log: List[str], use_matmul: bool = False, grad_in: bool = True) -> List[str]:
    x = torch.randn(3, 5, 6, requires_grad=grad_in)  # 15 rows (30 once gathered under SP)
    y = layer.matmul(x) if use_matmul else layer(x)
    del log[:]  # the forward's all-gather under SP
    with _Calls(log):
        y.backward(torch.randn_like(y))
    return log


@pytest.mark.parametrize("sp", [False, True], ids=["all-reduce", "sp-reduce-scatter"])
def test_the_input_grad_collective_starts_before_the_weight_grad_and_ends_after_it(monkeypatch, sp):
    collective, rows = ("reduce_scatter", 30) if sp else ("all_reduce", 15)
    for bias in (True, False):
        for use_matmul in (False, True):  # forward, and the fused bias + GeLU path's matmul()
            log: List[str] = []
            layer = _spy_layer(monkeypatch, log, bias, sp)
            calls = _backward_calls(layer, log, use_matmul)
            # dX first, its collective started without waiting, dW (4x6) meanwhile, then the wait
            assert calls == [f"mm({rows}, 6)", f"{collective}(async)", "mm(4, 6)", "wait"], (bias, use_matmul, calls)
            assert layer.weight.grad is not None
            if bias and not use_matmul:
                assert layer.bias.grad is not None


@pytest.mark.parametrize("sp", [False, True], ids=["all-reduce", "sp-reduce-scatter"])
def test_the_two_node_path_would_fail_the_order_check(monkeypatch, sp):
    """The check above can fail: the two-node path (no overlap) does both matmuls, then the collective."""
    log: List[str] = []
    calls = _backward_calls(_two_node(_spy_layer(monkeypatch, log, True, sp)), log)
    assert calls[-1] == ("reduce_scatter" if sp else "all_reduce") and len(calls) == 3, calls


@pytest.mark.parametrize("sp", [False, True], ids=["all-reduce", "sp-reduce-scatter"])
def test_under_torch_compile_the_layer_keeps_the_two_node_path(monkeypatch, sp):
    """Dynamo cannot trace async collectives: a compiled block would break its graph at each such layer
    (measured with train.compile on tp=2: 4 graphs per block instead of 1), so compiled code takes the
    two nodes, which it traces whole."""
    log: List[str] = []
    layer = _spy_layer(monkeypatch, log, True, sp)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    calls = _backward_calls(layer, log)
    assert calls[-1] == ("reduce_scatter" if sp else "all_reduce") and len(calls) == 3, calls


def test_no_input_grad_means_no_all_reduce(monkeypatch):
    log: List[str] = []
    calls = _backward_calls(_spy_layer(monkeypatch, log, True, sp=False), log, grad_in=False)
    assert calls == ["mm(4, 6)"], calls


class _Copies(TorchDispatchMode):
    """Counts the copies (clone: what .contiguous() and a reshape that cannot view do)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func is torch.ops.aten.clone.default
        return func(*args, **(kwargs or {}))


def test_the_sequence_collectives_copy_once(monkeypatch):
    """The all-gather and reduce-scatter along the sequence (dim 1 of [batch, seq, features]) reorder their
    data once: the collectives take and give the ranks' blocks stacked (they used to copy on both sides)."""
    _spy_layer(monkeypatch, [], True, True)  # the spy collectives of a pretend tp=2 group
    x = torch.randn(4, 8, 5)
    for name, fn in (("all-gather", comm._all_gather), ("reduce-scatter", comm._reduce_scatter)):
        with _Copies() as copies:
            out = fn(x, 1, None)
        assert copies.n == 1 and out.is_contiguous(), (name, copies.n)
    with _Copies() as copies:
        comm._all_gather(x, 0, None), comm._reduce_scatter(x, 0, None)
    assert copies.n == 0  # along dim 0 the stack is the layout


def test_the_row_parallel_output_is_all_reduced_in_place(monkeypatch):
    """The partial sums of a row-parallel linear are reduced where the matmul wrote them (no copy first)."""
    log: List[str] = []
    _spy_layer(monkeypatch, log, True, False)
    layer = RowParallelLinear(nn.Linear(8, 6), types.SimpleNamespace(tp_rank=0, tp_size=2, tp_group=None), False)
    x = torch.randn(3, 5, 4, requires_grad=True)
    with _Copies() as copies:
        y = layer(x)
    assert copies.n == 0 and log == ["all_reduce"], (copies.n, log)
    y.sum().backward()  # autograd takes the in-place reduce (its output is the matmul's, marked dirty)
    torch.testing.assert_close(x.grad, layer.weight.detach().sum(0).expand(3, 5, 4))


# ---------------------------------------------------------------------------------------- bitwise, tp=2
BASE = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, seq_len=16, vocab_size=128)
MODELS = {
    # biases, GeLU on the fused bias + GeLU kernel (ColumnParallelLinear.matmul), activation checkpointing
    "gelu-fused-bias-ckpt": GPTConfig(**BASE, position="learned", kernels="fused", activation_checkpointing="full"),
    # no biases, SwiGLU, tied head (its input edge is the final norm's hook, not a column-parallel layer)
    "swiglu-tied-nobias": GPTConfig(**BASE, position="rotary", rotary_dims=4, mlp="swiglu", tied_embeddings=True,
                                    norm="rmsnorm", bias=False),
}


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a, b), f"{what}: max difference {(a.double() - b.double()).abs().max().item():.3e}"


def _check_layer(topo: Topology, sp: bool, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 size: tuple = (3, 7, 24, 40)) -> None:
    """size: batch, tokens (this rank's under SP), input and output features (all ranks')."""
    b, t, d_in, d_out = size
    full = t * (topo.tp_size if sp else 1)
    for bias in (True, False):
        torch.manual_seed(0)
        layer = ColumnParallelLinear(nn.Linear(d_in, d_out, bias=bias), topo, sequence_parallel=sp).to(device, dtype)
        ref = _two_node(layer)
        # x is the same on every rank (replicated), under SP each rank's own tokens; each rank's output
        # gradient is its own (its shard's)
        x = torch.randn(b, t, d_in, generator=torch.Generator().manual_seed(10 + (topo.tp_rank if sp else 0)))
        dy = torch.randn(b, full, d_out // topo.tp_size, generator=torch.Generator().manual_seed(1 + topo.tp_rank))
        x, dy = x.to(device, dtype), dy.to(device, dtype)
        grads = []
        for m in (layer, ref):
            xi = x.clone().requires_grad_(True)
            for _ in range(2):  # two micro-batches: autograd accumulates into .grad
                m(xi).backward(dy)
            grads.append([xi.grad, m.weight.grad] + ([m.bias.grad] if bias else []))
        for a, b_, what in zip(*grads, ("input", "weight", "bias")):
            _same(a, b_, f"layer sp={sp} bias={bias} {dtype} grad of the {what}")


def _check_model(topo: Topology, name: str, cfg: GPTConfig, sp: bool) -> None:
    torch.manual_seed(0)
    model = apply_tensor_parallel(GPT(cfg), topo, sequence_parallel=sp)
    ref = _two_node(model)
    assert any(type(m) is ColumnParallelLinear for m in model.modules())
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g),
                torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)) for _ in range(2)]
    losses = []
    for m in (model, ref):
        for tokens, targets in batches:  # two micro-batches accumulated
            loss = vocab_parallel_cross_entropy(m(tokens), targets, topo.tp_group)
            loss.backward()
        losses.append(loss.detach())
    _same(*losses, f"{name} sp={sp} loss")
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        _same(p.grad, q.grad, f"{name} sp={sp} grad {n}")


def _check_collectives(topo: Topology) -> None:
    """The all-gather and reduce-scatter along each dim against torch.cat and a sum, on every rank."""
    n, r, group = topo.tp_size, topo.tp_rank, topo.tp_group
    every = [torch.arange(4 * 6 * 8, dtype=torch.float32).reshape(4, 6, 8) * (k + 1) + k for k in range(n)]
    for dim in (0, 1, 2, -1):
        _same(comm._all_gather(every[r], dim, group), torch.cat(every, dim), f"all-gather along {dim}")
        _same(comm._reduce_scatter(every[r], dim, group), sum(every).chunk(n, dim)[r], f"reduce-scatter along {dim}")


def _worker(rank: int, world: int) -> None:
    topo = Topology.build(tp=world)
    _check_collectives(topo)
    for sp in (False, True):
        _check_layer(topo, sp)
        for name, cfg in MODELS.items():
            _check_model(topo, name, cfg, sp)


def test_tp2_overlapped_backward_is_bitwise_the_two_node_path(two_ranks) -> None:
    two_ranks.outcome("tp_overlap")


def _gpu_worker(rank: int, world: int) -> None:
    """On GPUs over nccl, in bf16 at a 1.3B layer's width: the async collective on its own stream while the
    weight gradient's GEMM runs, bitwise the two-node path."""
    topo = Topology.build(tp=world)
    for sp in (False, True):
        _check_layer(topo, sp, "cuda", torch.bfloat16, size=(4, 1024 if sp else 2048, 2048, 6144))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_gpu_tp2_overlapped_backward_is_bitwise_the_two_node_path() -> None:
    from support.workers import run_workers

    run_workers(_gpu_worker, 2, timeout=300, init="neox")
