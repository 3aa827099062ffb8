"""Sequence parallelism: a block's replicated parameters (the norms' weights and biases, the row-parallel
biases) have their gradients summed over the TP group by one all-reduce per block in backward
(`SequenceParallelParams`), not one per tensor, and the gradients are bitwise those of the per-tensor
path (each module's own copy_to_tp, what the modules fall back to outside their owner's call).

Two gloo processes; the per-tensor path is the reference, run on a deep copy with the bundles removed.
"""
from __future__ import annotations

import copy

import torch

from support.workers import run_workers

CFG = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, d_ff=64, seq_len=16, vocab_size=128)


def _grads_and_reduces(model, topo, tokens, targets) -> tuple:
    """(the gradients by name, the sizes of the all-reduces the backward ran)."""
    from neox.parallel import comm, vocab_parallel_cross_entropy

    loss = vocab_parallel_cross_entropy(model(tokens), targets, topo.tp_group)
    calls = []
    real = comm._all_reduce

    def counting(x, group):
        calls.append(x.numel())
        return real(x, group)

    comm._all_reduce = counting  # this worker process's own module: nothing to restore for other tests
    try:
        loss.backward()
    finally:
        comm._all_reduce = real
    return {n: p.grad.clone() for n, p in model.named_parameters()}, calls


def _check(rank: int, world: int, layernorm: bool, ckpt: str) -> None:
    from neox.model.gpt import GPT, GPTConfig
    from neox.parallel import Topology, apply_tensor_parallel
    from neox.parallel.tensor import SequenceParallelNorm, RowParallelLinear

    topo = Topology.build(tp=2)
    cfg = GPTConfig(**CFG, position="rotary", rotary_dims=4, norm="layernorm" if layernorm else "rmsnorm",
                    bias=layernorm, activation_checkpointing=ckpt)
    torch.manual_seed(0)
    bundled = apply_tensor_parallel(GPT(cfg), topo, sequence_parallel=True)
    per_tensor = copy.deepcopy(bundled)
    for m in per_tensor.modules():
        if isinstance(m, (SequenceParallelNorm, RowParallelLinear)):
            m.sp_params = None  # each module enters its own parameters (the reference path)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)

    got, calls = _grads_and_reduces(bundled, topo, tokens, targets)
    want, ref_calls = _grads_and_reduces(per_tensor, topo, tokens, targets)
    for name in want:
        assert torch.equal(got[name], want[name]), f"grad {name} differs from the per-tensor path"
    per_block = 6 if layernorm else 2  # two norms' weights (and biases), the two row-parallel biases (if any)
    final = 2 if layernorm else 1
    assert len(ref_calls) == cfg.n_layers * per_block + final, ref_calls
    assert len(calls) == cfg.n_layers + 1, f"all-reduces in backward: {calls} (one per block and the final norm)"


def test_one_all_reduce_per_block_same_gradients_layernorm_with_biases() -> None:
    run_workers(_check, 2, True, "none", timeout=180)


def test_one_all_reduce_per_block_same_gradients_rmsnorm_checkpointed() -> None:
    run_workers(_check, 2, False, "full", timeout=180)


def _check_token_order(rank: int, world: int) -> None:
    from neox.model.gpt import GPT, GPTConfig
    from neox.parallel import Topology, apply_tensor_parallel
    from neox.parallel.comm import SEQ_DIM, TOKEN_DIM, _all_gather, _start_reduce_scatter

    topo = Topology.build(tp=2)
    model = apply_tensor_parallel(GPT(GPTConfig(**CFG)), topo, sequence_parallel=True)
    block = model.blocks[0]
    # the MLP is token-wise: gathered and scattered along dim 0; attention and the head keep the sequence order
    assert (block.mlp.fc_in.sp_dim, block.mlp.fc_out.sp_dim) == (TOKEN_DIM, TOKEN_DIM)
    assert (block.attn.proj.sp_dim, model.head.proj.sp_dim) == (SEQ_DIM, SEQ_DIM)
    # along dim 0 neither side copies the activations: the gather is the collective's own buffer, the
    # reduce-scatter reads its input as is; along the sequence each side makes a strided copy
    x = torch.arange(24.0).view(2, 3, 4) + 100 * rank
    gathered = _all_gather(x, TOKEN_DIM, topo.tp_group)
    assert gathered._is_view() and torch.equal(gathered[2 * rank:2 * rank + 2], x)
    assert not _all_gather(x, SEQ_DIM, topo.tp_group)._is_view()
    full = torch.arange(48.0).view(4, 3, 4)
    out, _ = _start_reduce_scatter(full, TOKEN_DIM, topo.tp_group, async_op=False)
    assert torch.equal(out, 2 * full[2 * rank:2 * rank + 2])  # rank r's rows, summed over the 2 ranks


def test_the_mlp_gathers_and_scatters_tokens_without_reordering_them() -> None:
    run_workers(_check_token_order, 2, timeout=120)


def _check_zero3(rank: int, world: int) -> None:
    """Under ZeRO-3 a block's parameters are gathered per module, after the block's pre-hook: the modules
    enter their own parameters (the bundle stands aside), and a training step runs and moves the weights."""
    import deepspeed

    from neox.model.gpt import GPT, GPTConfig
    from neox.parallel import Topology, apply_tensor_parallel, make_loss_fn

    cfg = GPTConfig(**{**CFG, "n_kv_heads": 2}, position="rotary", rotary_dims=4, bias=True)
    topo = Topology.build(tp=2)
    torch.manual_seed(0)
    model = apply_tensor_parallel(GPT(cfg), topo, sequence_parallel=True)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      config=config, mpu=topo.mpu())
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(5))
    losses = []
    for _ in range(2):
        loss = make_loss_fn(topo.tp_group)(engine(tokens), tokens)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0], losses


def test_zero3_with_sequence_parallelism_trains() -> None:
    run_workers(_check_zero3, 2, timeout=240, init="neox")
