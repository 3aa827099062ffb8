"""Dropout under TP: per-rank streams inside TP regions, identical streams outside, exact replay
under activation recomputation, and a save/loadable random state."""
from __future__ import annotations

import dataclasses

import torch

from neox.model.gpt import GPT, GPTConfig
from neox.checkpoint.rng import rng_state as get_rng_state, set_rng_state
from neox.parallel import (Topology, TPRandom, apply_tensor_parallel, gather_full_state_dict, seed_all,
                           vocab_parallel_cross_entropy)
from neox.parallel.comm import all_gather_no_grad


CFG = GPTConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, seq_len=16, vocab_size=128,
                position="rotary", rotary_dims=8, mlp="swiglu", dropout=0.2, attn_dropout=0.2)


def _same_on_all_ranks(t: torch.Tensor, group) -> bool:
    both = all_gather_no_grad(t.unsqueeze(0), 0, group)
    return all(torch.equal(both[0], other) for other in both[1:])


def _check_fork(topo: Topology) -> None:
    rng = TPRandom(topo.tp_rank)
    seed_all(3)
    assert _same_on_all_ranks(torch.rand(8), topo.tp_group)
    with rng.fork(torch.device("cpu")):
        assert not _same_on_all_ranks(torch.rand(8), topo.tp_group), "forked streams must differ per rank"
    assert _same_on_all_ranks(torch.rand(8), topo.tp_group), "the default stream must stay shared"


def _loss_and_grads(model: GPT, topo: Topology, tokens, targets, seed: int):
    seed_all(seed)
    model.zero_grad(set_to_none=True)
    loss = vocab_parallel_cross_entropy(model(tokens), targets, topo.tp_group)
    loss.backward()
    return loss.detach(), gather_full_state_dict(model, topo, grads=True)


def _check_recompute_replays(topo: Topology, sp: bool) -> None:
    torch.manual_seed(0)
    plain = apply_tensor_parallel(GPT(CFG), topo, sequence_parallel=sp)
    torch.manual_seed(0)
    ckpt = apply_tensor_parallel(GPT(dataclasses.replace(CFG, activation_checkpointing="full")), topo,
                                 sequence_parallel=sp)
    g = torch.Generator().manual_seed(1)
    tokens, targets = (torch.randint(0, CFG.vocab_size, (2, CFG.seq_len), generator=g) for _ in range(2))

    # Outside TP regions the residual stream is replicated, so its dropout masks must agree.
    seen = {}
    hook = plain.norm_f.register_forward_hook(lambda m, a, out: seen.update(x=out.detach()))
    loss_a, grads_a = _loss_and_grads(plain, topo, tokens, targets, seed=7)
    hook.remove()
    if not sp:
        assert _same_on_all_ranks(seen["x"], topo.tp_group), "replicated activations diverged across TP ranks"

    loss_b, grads_b = _loss_and_grads(ckpt, topo, tokens, targets, seed=7)
    assert torch.equal(loss_a, loss_b), f"sp={sp}: recomputation changed the loss {loss_a} -> {loss_b}"
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-7, msg=lambda m: f"{name}: {m}")

    # Dropout is really on, and a saved random state replays the same masks.
    plain.eval()
    with torch.no_grad():
        eval_loss = vocab_parallel_cross_entropy(plain(tokens), targets, topo.tp_group)
    plain.train()
    assert not torch.allclose(eval_loss, loss_a)
    state = get_rng_state()
    with torch.no_grad():
        first = vocab_parallel_cross_entropy(plain(tokens), targets, topo.tp_group)
        set_rng_state(state)
        again = vocab_parallel_cross_entropy(plain(tokens), targets, topo.tp_group)
    assert torch.equal(first, again)


def _worker(rank: int, world: int) -> None:
    topo = Topology.build(tp=world)
    _check_fork(topo)
    for sp in (False, True):
        _check_recompute_replays(topo, sp)


def test_dropout_streams_and_recompute_replay(two_ranks) -> None:
    two_ranks.outcome("tp_random")  # _worker, run by the folder's shared 2-process spawn (conftest.py)
