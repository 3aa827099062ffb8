"""parallelism.tp_overlap: an overlapping block (neox.parallel.overlap) interleaves two halves of the batch
so that one half's forward all-reduce runs while the other half computes. Against the same tp=2 model
without it (the reference): the same logits and loss bitwise (each token's arithmetic is unchanged), the
gradients to rounding (the weight gradients sum the halves), every forward all-reduce of the blocks
started asynchronously; a batch of one row runs the plain block. Two gloo processes.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from support.workers import run_workers

BASE = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, d_ff=64, seq_len=16, vocab_size=128)


def _forward_backward(model, topo, tokens, targets) -> tuple:
    from neox.parallel import vocab_parallel_cross_entropy

    calls = []
    real = dist.all_reduce

    def recording(tensor, *args, async_op=False, **kwargs):
        calls.append(async_op)
        return real(tensor, *args, async_op=async_op, **kwargs)

    dist.all_reduce = recording  # this worker process's own module
    try:
        logits = model(tokens)
        forward_calls = list(calls)
        loss = vocab_parallel_cross_entropy(logits, targets, topo.tp_group)
        loss.backward()
    finally:
        dist.all_reduce = real
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads, forward_calls


def _check(rank: int, world: int, parallel_residual: bool, batch: int) -> None:
    from neox.model.gpt import GPT, GPTConfig
    from neox.parallel import Topology, apply_tensor_parallel

    topo = Topology.build(tp=2)
    cfg = GPTConfig(**BASE, position="rotary", rotary_dims=4, parallel_residual=parallel_residual)
    torch.manual_seed(0)
    full = GPT(cfg)
    plain = apply_tensor_parallel(copy.deepcopy(full), topo)
    overlapped = apply_tensor_parallel(copy.deepcopy(full), topo, overlap=True)
    from neox.model.gpt import Block

    # a subclass that keeps the name: DeepSpeed's pipeline picks the layers it checkpoints by class name
    assert type(overlapped.blocks[0]) is not Block and type(overlapped.blocks[0]).__name__ == "Block"
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=g)
    ref = _forward_backward(plain, topo, tokens, targets)
    got = _forward_backward(overlapped, topo, tokens, targets)
    assert torch.equal(got[0], ref[0]), "logits differ from the unsplit blocks'"
    assert torch.equal(got[1], ref[1]), "loss differs"
    for name, want in ref[2].items():
        err = ((got[2][name] - want).abs().max() / want.abs().max().clamp(min=1e-12)).item()
        assert err <= 1e-5, f"grad {name}: relative error {err:.2e}"
    blocks_async = sum(got[3])
    if batch >= 2:  # two reduces per block per half, all started without waiting
        assert blocks_async == 4 * cfg.n_layers, got[3]
    else:
        assert blocks_async == 0 and got[3] == ref[3], (got[3], ref[3])


@pytest.mark.parametrize("parallel_residual", [False, True])
def test_overlapping_blocks_match_the_plain_ones(parallel_residual: bool) -> None:
    run_workers(_check, 2, parallel_residual, 4, timeout=180)


def test_a_batch_of_one_runs_the_plain_block() -> None:
    run_workers(_check, 2, False, 1, timeout=180)
