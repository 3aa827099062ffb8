"""Tensor parallelism with every op on the compiled kernels: TP=2 (two gloo processes) with
model.kernels=fused against TP=1 on the PyTorch references, same weights. Covers what only TP exercises:
the column-parallel linear's output before its bias (fused bias + GeLU on each shard), the fused
vocab-parallel cross-entropy (this rank's vocab_start, ignore_index), ALiBi's per-rank head offset
through the masked softmax; sequence parallelism off and on. And Pythia's parallel residual, whose fused
block (dual_norm + add3) runs with sequence parallelism off and keeps the separate norms with it on."""
from __future__ import annotations

import copy
import dataclasses

import torch

from neox.model.gpt import GPT, GPTConfig, cross_entropy_loss
from neox.parallel import Topology, apply_tensor_parallel, gather_full_state_dict, vocab_parallel_cross_entropy
from neox.parallel.comm import all_gather_no_grad


CFG = GPTConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, seq_len=16, vocab_size=128,
                position="alibi", kernels="reference")
PARALLEL = dataclasses.replace(CFG, position="rotary", rotary_dims=4, parallel_residual=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def _worker(rank: int, world: int) -> None:
    topo = Topology.build(tp=world)
    for cfg in (CFG, PARALLEL):
        _check(topo, cfg)


def _check(topo: Topology, cfg: GPTConfig) -> None:
    torch.manual_seed(0)
    ref = GPT(cfg)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)
    targets[1, :4] = -100
    ref_logits = ref(tokens)
    ref_loss = cross_entropy_loss(ref_logits, targets)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for sp in (False, True):
        fused = GPT(dataclasses.replace(cfg, kernels="fused"))
        fused.load_state_dict(ref.state_dict())
        model = apply_tensor_parallel(copy.deepcopy(fused), topo, sequence_parallel=sp)
        assert model.blocks[0]._fuses_norm_pair(tokens) is not sp  # SP swaps the norms for its own
        logits = model(tokens)
        full = all_gather_no_grad(logits.detach().clone(), -1, topo.tp_group)  # before the loss reuses it
        loss = vocab_parallel_cross_entropy(logits, targets, topo.tp_group, impl="fused")
        loss.backward()
        assert _rel(full, ref_logits.detach()) <= 1e-5, f"sp={sp} logits"
        assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()), f"sp={sp} loss"
        grads = gather_full_state_dict(model, topo, grads=True)
        for n, grad in ref_grads.items():
            assert _rel(grads[n], grad) <= 1e-5, f"sp={sp} grad {n}: {_rel(grads[n], grad):.2e}"


def test_tp2_fused_matches_tp1_reference(two_ranks) -> None:
    two_ranks.outcome("tp_fused")  # _worker, run by the folder's shared 2-process spawn (conftest.py)
