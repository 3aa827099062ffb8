"""TP=2 (two gloo processes) against TP=1 with the same weights: logits, loss, gradients, 20 AdamW
steps, with sequence parallelism off and on, over the model's variants (rotary/learned/ALiBi,
GQA/MHA, SwiGLU/GeLU, tied/untied, RMSNorm/LayerNorm, parallel/sequential residual)."""
from __future__ import annotations

import copy

import pytest
import torch

from neox.model.gpt import GPT, GPTConfig, cross_entropy_loss
from neox.parallel import Topology, apply_tensor_parallel, gather_full_state_dict, vocab_parallel_cross_entropy
from neox.parallel.comm import all_gather_no_grad


BASE = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, d_ff=64, seq_len=16, vocab_size=128)

CASES = {
    # rotary on half of each head, GQA with one kv group per rank, SwiGLU, tied, RMSNorm, no bias
    "rotary-gqa-swiglu-tied": GPTConfig(**{**BASE, "n_kv_heads": 2}, position="rotary", rotary_dims=4,
                                        mlp="swiglu", tied_embeddings=True, norm="rmsnorm", bias=False),
    # learned positions, MHA, GeLU, untied, parallel residual, biases
    "learned-mha-gelu-parallel": GPTConfig(**BASE, position="learned", parallel_residual=True),
    # ALiBi (per-rank head offset), GQA, activation checkpointing on
    "alibi-gqa-ckpt": GPTConfig(**{**BASE, "n_kv_heads": 2}, position="alibi",
                                activation_checkpointing="full"),
    # rotary GPT-J layout, GQA with 4 q heads per kv group, tied, SwiGLU
    "rotary-interleaved-gqa4": GPTConfig(**{**BASE, "n_heads": 8, "n_kv_heads": 2, "d_model": 64},
                                         position="rotary", rotary_dims=8, rotary_interleaved=True,
                                         tied_embeddings=True, mlp="swiglu"),
}

STEPS = 20


def _batch(cfg: GPTConfig, seed: int, ignore: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)
    if ignore:
        targets[0, :3] = -100  # ignore_index, as the plain loss
    return tokens, targets


def _rel_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    scale = expected.abs().max().clamp(min=1e-12)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"{what}: max error {err:.2e} relative to max |ref| (tolerance {rtol})"


def _check_case(topo: Topology, name: str, cfg: GPTConfig, sp: bool) -> None:
    torch.manual_seed(0)
    ref = GPT(cfg)
    model = apply_tensor_parallel(copy.deepcopy(ref), topo, sequence_parallel=sp)
    tag = f"{name} sp={sp}"
    ignore = "learned" in name
    tokens, targets = _batch(cfg, 1, ignore)

    # forward + backward
    ref_logits = ref(tokens)
    ref_loss = cross_entropy_loss(ref_logits, targets)
    ref_loss.backward()
    logits = model(tokens)
    assert logits.shape[-1] == cfg.vocab_size // topo.tp_size  # the head never gathers the vocab
    loss = vocab_parallel_cross_entropy(logits, targets, topo.tp_group)
    loss.backward()
    _rel_close(all_gather_no_grad(logits, -1, topo.tp_group), ref_logits.detach(), f"{tag} logits")
    _rel_close(loss.detach(), ref_loss.detach(), f"{tag} loss")
    with torch.no_grad():  # a TP model deep-copies (EMA, eval copies) and the copy still works
        torch.testing.assert_close(copy.deepcopy(model)(tokens), logits, rtol=0, atol=0)
    grads = gather_full_state_dict(model, topo, grads=True)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    assert grads.keys() == ref_grads.keys(), f"{tag}: parameter names differ"
    for n in ref_grads:
        _rel_close(grads[n], ref_grads[n], f"{tag} grad {n}")

    # 20 AdamW steps follow the TP=1 loss curve
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ref_opt.zero_grad(), opt.zero_grad()
    for step in range(STEPS):
        tokens, targets = _batch(cfg, 100 + step, ignore)
        ref_loss = cross_entropy_loss(ref(tokens), targets)
        ref_loss.backward()
        ref_opt.step(), ref_opt.zero_grad()
        loss = vocab_parallel_cross_entropy(model(tokens), targets, topo.tp_group)
        loss.backward()
        opt.step(), opt.zero_grad()
        diff = abs(loss.item() - ref_loss.item())
        assert diff < 1e-4, f"{tag} step {step}: loss {loss.item():.6f} vs TP=1 {ref_loss.item():.6f}"


def _worker(rank: int, world: int, names: list[str]) -> None:
    topo = Topology.build(tp=world)
    for name in names:
        for sp in (False, True):
            _check_case(topo, name, CASES[name], sp)


# Two checks of two cases each, run by the folder's shared 2-process spawn (conftest.py: two_ranks).
GROUPS = [["rotary-gqa-swiglu-tied", "learned-mha-gelu-parallel"], ["alibi-gqa-ckpt", "rotary-interleaved-gqa4"]]


@pytest.mark.parametrize("group", range(len(GROUPS)), ids=["-".join(g) for g in GROUPS])
def test_tp2_matches_tp1(two_ranks, group: int) -> None:
    two_ranks.outcome(f"tp_equivalence{group}")
