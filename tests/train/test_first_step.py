"""A fresh engine's first optimizer step is AdamW's first step under every bf16 layout.

DeepSpeed's bf16/fp16 ZeRO-0 optimizer (`FP16_UnfusedOptimizer`) creates AdamW's state with a step
on zero gradients, leaving every step counter at 1: each later update then used the next step's
bias correction (the first 0.73x AdamW's), and 1.3B runs on one GPU lagged the same run under the
pipeline by 0.12 in loss after one step. `neox.train.engine.undo_state_init_step` resets it.

The reference is an independent path: ZeRO-1's optimizer (flat fp32 partitions, state created by
AdamW's own first step) on the same model, batch and schedule.
"""
from __future__ import annotations

import torch

from support.workers import run_workers


def _one_step(zero: int, out_dir: str):
    """(the weights after one engine step, the AdamW state counters after it) for bf16 ZeRO-`zero`."""
    from neox.model.gpt import GPT, cross_entropy_loss
    from neox.train import engine as engine_lib
    from support.plans import cpu, plan_of

    _, plan = plan_of(["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.seq_len=16",
                       "train.micro_batch=2", "train.grad_accum=1", "data.embedded_vocab=257",
                       "train.precision=bf16", f"parallelism.zero_stage={zero}", "optim.warmup_steps=10",
                       f"run_dir={out_dir}"], cpu(1))
    torch.manual_seed(0)
    engine, inner, _ = engine_lib.initialize(GPT(plan.model), plan, torch.device("cpu"))
    tokens = torch.randint(0, plan.model.vocab_size, (2, plan.model.seq_len + 1),
                           generator=torch.Generator().manual_seed(1))
    before = [p.detach().float().clone() for p in engine.module.parameters()]
    opt = engine.optimizer
    for params, masters in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", [])):
        # the fp32 masters are the weights again (DeepSpeed's zero-gradient step had decayed them)
        assert all(torch.equal(m, p.float()) for p, m in zip(params, masters)), "the masters are not the weights"
    engine.backward(cross_entropy_loss(engine(tokens[:, :-1]), tokens[:, 1:]))
    engine.step()
    after = [p.detach().float().clone() for p in engine.module.parameters()]
    counters = {float(s["step"]) for s in inner.state.values() if "step" in s}
    return before, after, counters


def _check(rank: int, world: int, out_dir: str) -> None:
    b0, a0, counters0 = _one_step(0, f"{out_dir}/z0")
    b1, a1, counters1 = _one_step(1, f"{out_dir}/z1")
    assert all(torch.equal(x, y) for x, y in zip(b0, b1)), "the two engines did not start from the same weights"
    assert counters0 == {1.0} and counters1 == {1.0}, f"AdamW step counters after one step: {counters0}, {counters1}"
    # AdamW's first update is about lr * sign(g) per weight: the sizes agree to bf16 rounding of the weights
    moved0 = torch.cat([(a - b).abs().flatten() for a, b in zip(a0, b0)])
    moved1 = torch.cat([(a - b).abs().flatten() for a, b in zip(a1, b1)])
    ratio = (moved0.sum() / moved1.sum()).item()
    assert abs(ratio - 1.0) < 0.03, f"ZeRO-0's first update is {ratio:.3f}x ZeRO-1's"


def test_bf16_zero0_first_update_is_adamws_first(tmp_path) -> None:
    run_workers(_check, 1, str(tmp_path), timeout=240, init="neox")
