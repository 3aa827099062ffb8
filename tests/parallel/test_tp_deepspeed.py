"""The Topology's groups drive DeepSpeed: tp=2 with ZeRO-0, and tp=2 x dp=2 with ZeRO-1 and
sequence parallelism, with gradient clipping, follow the TP=1 model trained with plain torch +
clip_grad_norm_ on all the data-parallel micro-batches. So the gradient norm counts replicated
parameters once and sharded ones fully, and ZeRO averages over the dp group only. SGD, not Adam:
Adam's update is nearly invariant to a wrong clipping factor, SGD's is proportional to it."""
from __future__ import annotations

import copy

import torch

from neox.model.gpt import GPT, GPTConfig, cross_entropy_loss
from neox.parallel import Topology, apply_tensor_parallel, gather_full_state_dict, make_loss_fn


CFG = GPTConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, seq_len=16, vocab_size=128,
                position="rotary", rotary_dims=8, mlp="swiglu", tied_embeddings=True)
CLIP, LR, STEPS = 0.05, 1.0, 5


def _worker(rank: int, world: int, zero_stage: int, sp: bool) -> None:
    import deepspeed  # in the worker: its import is slow and the parent does not need it

    topo = Topology.build(tp=2)
    torch.manual_seed(0)
    ref = GPT(CFG)
    model = apply_tensor_parallel(copy.deepcopy(ref), topo, sequence_parallel=sp)
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "gradient_clipping": CLIP, "zero_optimization": {"stage": zero_stage},
                 "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                      config=ds_config, mpu=topo.mpu())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    loss_fn = make_loss_fn(topo.tp_group)
    g = torch.Generator().manual_seed(5)
    for step in range(STEPS):
        # one micro-batch per data-parallel rank; TP=1 sees them all (mean loss = mean of means)
        batches = [[torch.randint(0, CFG.vocab_size, (2, CFG.seq_len), generator=g) for _ in range(2)]
                   for _ in range(topo.dp_size)]
        ref_losses = [cross_entropy_loss(ref(tok), tgt) for tok, tgt in batches]
        torch.stack(ref_losses).mean().backward()
        ref_loss = ref_losses[topo.dp_rank]
        tokens, targets = batches[topo.dp_rank]
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        ref_opt.step(), ref_opt.zero_grad()
        assert ref_norm > 2 * CLIP, "clipping must be active for this test to mean anything"

        loss = loss_fn(engine(tokens), targets)
        engine.backward(loss)
        engine.step()
        norm = engine.get_global_grad_norm()  # ZeRO-1 reports it; ZeRO-0 fp32 clips without storing it
        if norm is not None:
            assert abs(float(norm) - ref_norm.item()) <= 1e-5 * ref_norm.item(), \
                f"ZeRO-{zero_stage} step {step}: grad norm {float(norm):.6f} vs TP=1 {ref_norm.item():.6f}"
        params = gather_full_state_dict(model, topo)
        for name, p in ref.named_parameters():
            err = (params[name] - p.detach()).abs().max() / p.detach().abs().max()
            assert err < 1e-5, f"ZeRO-{zero_stage} step {step}: {name} off by {err:.2e} relative"
        assert abs(loss.item() - ref_loss.item()) < 1e-4, \
            f"ZeRO-{zero_stage} step {step}: loss {loss.item():.6f} vs TP=1 {ref_loss.item():.6f}"


def test_deepspeed_with_mpu_matches_tp1_zero0(two_ranks) -> None:
    """tp=2, ZeRO-0: _worker(zero_stage=0, sp=False), run by the folder's shared spawn (conftest.py)."""
    two_ranks.outcome("tp_deepspeed")


def test_deepspeed_with_mpu_matches_tp1_zero1_dp2_sequence_parallel(four_ranks) -> None:
    """tp=2 x dp=2 on 4 processes: ZeRO partitions and averages over the dp group only."""
    four_ranks.outcome("tp_deepspeed")
