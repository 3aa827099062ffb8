"""The planner's memory terms against hand arithmetic for a small model (every ZeRO stage, tp, sequence
parallelism, pp and checkpointing), and the activation count per token against what autograd really
keeps for one block on this CPU (neox's fused kernels, bf16)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from neox.model.gpt import Block, GPTConfig, count_params
from neox.planner.layout import Candidate, stage_bounds, stages
from neox.planner.memory import estimate, layer_activation_bytes, stage_memory
from tp_activation_probe import saved_bytes

# 4 layers, h 64, 4 heads, d_ff 256, seq 32, vocab 256, learned positions, biases, LayerNorm, GeLU, untied.
M = GPTConfig(n_layers=4, d_model=64, n_heads=4, n_kv_heads=4, d_ff=256, seq_len=32, vocab_size=256,
              position="learned")
# By hand: a block is qkv 64*192+192, proj 64*64+64, fc_in 64*256+256, fc_out 256*64+64, two norms 2*128
BLOCK = 12480 + 4160 + 16640 + 16448 + 256  # 49984
P = (256 * 64 + 32 * 64) + 4 * BLOCK + 128 + 256 * 64  # embedding + positions, blocks, final norm, head
TOKENS = 2 * 32  # micro-batch 2 of 32 tokens
# Per token per block, bf16: x, ln1 out, qkv (3h), SDPA out (h), x after attention, ln2 out: 8h;
# GeLU in and out 2f; fp32 mean/rstd of two norms 16 bytes; log-sum-exp 4 heads x 4 bytes.
PER_TOKEN = (8 * 64 + 2 * 256) * 2 + 16 + 16  # 2080
LOGITS = TOKENS * (256 * 2 + 2 * 64 * 2)  # bf16 logits (fused loss) + final norm in/out


def test_the_hand_count_of_parameters_is_the_models():
    assert count_params(M)["total"] == P == 234880


def one_stage(c: Candidate, **kw):
    return estimate(M, c, **kw)


@pytest.mark.parametrize("zero,weights,grads,optim,buffers,step", [
    (0, 2 * P, 2 * P, 12 * P, None, 4 * P + 2 * P),  # fp32 copies of the grads + the flat all-reduce bucket
    # ZeRO-1/2's step: the partition's gradients flattened (bf16) and cast to fp32
    (1, 2 * P, 2 * P, 12 * P / 4, 2 * P * 2, (2 + 4) * P / 4),
    (2, 2 * P, 2 * P / 4, 12 * P / 4, 2 * P * 2, (2 + 4) * P / 4),
    (3, 2 * P / 4, 2 * P / 4, 12 * P / 4, 2 * P * 2 + 2 * BLOCK * 2, 4 * P / 4),
])
def test_model_states_under_each_zero_stage(zero, weights, grads, optim, buffers, step):
    mem = one_stage(Candidate(dp=4, zero_stage=zero, micro_batch=2))
    assert mem.terms["weights"] == pytest.approx(weights)
    assert mem.terms["gradients"] == pytest.approx(grads)
    assert mem.terms["optimizer states"] == pytest.approx(optim)
    assert mem.terms.get("communication buffers") == (pytest.approx(buffers) if buffers else None)
    assert mem.step_extra == pytest.approx(step)


def test_fp32_has_no_master_copy():
    mem = one_stage(Candidate(micro_batch=2), precision="fp32")
    assert (mem.terms["weights"], mem.terms["gradients"], mem.terms["optimizer states"]) == (4 * P, 4 * P, 8 * P)
    assert mem.step_extra == 0
    assert mem.terms["activations"] == pytest.approx(4 * TOKENS * ((8 * 64 + 2 * 256) * 4 + 32))


SHARDED = BLOCK - 2 * 128 - 64 - 64  # a block's weights tp splits: not the norms or the row-parallel biases


@pytest.mark.parametrize("tp,zero,copies", [(1, 0, 4 * SHARDED), (2, 1, 4 * SHARDED / 2), (1, 3, None)])
def test_fp8_holds_a_one_byte_copy_of_each_block_weight_until_the_step(tp, zero, copies):
    """neox.model.fp8 casts each weight once per optimizer step and keeps the copy from the first forward to
    the last backward; its state is bf16's (ZeRO-3 casts at every call: no copies)."""
    fp8, bf16 = (one_stage(Candidate(tp=tp, dp=2, zero_stage=zero, micro_batch=2), precision=p) for p in ("fp8", "bf16"))
    assert fp8.terms.get("fp8 weight copies") == (pytest.approx(copies) if copies else None)
    assert fp8.activations - bf16.activations == pytest.approx(copies or 0)
    assert fp8.states == bf16.states and fp8.step_extra == bf16.step_extra


def test_under_a_pipeline_the_fp8_copies_outlive_the_step():
    """The pipeline engine's optimizer step runs inside train_batch, before the trainer can drop the copies."""
    c = Candidate(pp=2, micro_batch=2, grad_accum=4)
    fp8, bf16 = (one_stage(c, precision=p) for p in ("fp8", "bf16"))
    assert fp8.terms["fp8 weight copies"] > 0
    assert fp8.step_extra - bf16.step_extra == pytest.approx(fp8.terms["fp8 weight copies"])


def test_activations_and_logits_without_parallelism():
    mem = one_stage(Candidate(micro_batch=2))
    assert mem.terms["activations"] == 4 * TOKENS * PER_TOKEN == 532480
    assert mem.terms["logits and loss"] == LOGITS
    # the reference loss keeps an fp32 copy, its softmax and gradient: 14 bytes per logit
    ref = one_stage(Candidate(micro_batch=2), fused_loss=False)
    assert ref.terms["logits and loss"] == TOKENS * (256 * 14 + 2 * 64 * 2)


def test_tensor_parallel_shards_what_tp_splits():
    mem = one_stage(Candidate(tp=2, micro_batch=2))
    # sharded: qkv, proj, fc_in, fc_out weights and the colwise biases (49600 of a block); replicated:
    # the rowwise biases and norms (384); the embedding and head split by vocab, positions replicated
    local = 4 * (49600 / 2 + 384) + (16384 / 2 + 2048) + 128 + 16384 / 2
    assert mem.terms["weights"] == pytest.approx(2 * local)
    # per token: norms 4h replicated; qkv 3h, SDPA out h and GeLU 2f split in two; stats 16 + 2 heads x 4
    assert mem.terms["activations"] == pytest.approx(4 * TOKENS * ((4 * 64 + (4 * 64 + 512) / 2) * 2 + 16 + 8))
    assert mem.terms["logits and loss"] == pytest.approx(TOKENS * (128 * 2 + 2 * 64 * 2))


def test_sequence_parallel_splits_the_norms_but_keeps_the_gathered_matmul_inputs():
    mem = one_stage(Candidate(tp=2, micro_batch=2, sequence_parallel=True))
    replicated = (4 * 64 - 2 * 64) / 2 + 2 * 64
    # norm statistics 16 / 2 bytes, log-sum-exp of 2 heads 8
    assert mem.terms["activations"] == pytest.approx(4 * TOKENS * ((replicated + (4 * 64 + 512) / 2) * 2 + 8 + 8))


def test_checkpointing_keeps_block_inputs_and_one_block():
    mem = one_stage(Candidate(micro_batch=2, checkpointing=True))
    assert mem.terms["activations"] == 4 * TOKENS * 64 * 2 + TOKENS * PER_TOKEN


def test_pipeline_first_stage_holds_pp_micro_batches_in_flight():
    c = Candidate(pp=2, zero_stage=1, micro_batch=2, grad_accum=4)
    assert stage_bounds(M, 2) == (0, 3, 7)  # embedding + 2 blocks | 2 blocks, final norm, head
    first, last = (stage_memory(M, c, st, "bf16") for st in stages(M, 1, 2))
    stage0 = 256 * 64 + 32 * 64 + 2 * BLOCK
    assert first.terms["weights"] == 2 * stage0 and first.terms["optimizer states"] == 12 * stage0
    assert first.terms["activations"] == 2 * 2 * TOKENS * PER_TOKEN  # 2 blocks x 2 micro-batches
    assert last.terms["activations"] == 2 * 1 * TOKENS * PER_TOKEN and last.terms["logits and loss"] == LOGITS
    assert first.terms["pipeline buffers"] == 2 * 2 * TOKENS * 64 * 2
    assert "logits and loss" not in first.terms
    assert estimate(M, c).stage == 0  # the most loaded
    fewer = stage_memory(M, dataclasses.replace(c, grad_accum=1), stages(M, 1, 2)[0], "bf16")
    assert fewer.terms["activations"] == 2 * 1 * TOKENS * PER_TOKEN  # only one micro-batch to hold


@pytest.mark.parametrize("change", [
    {}, {"parallel_residual": True}, {"position": "rotary", "rotary_dims": 16}, {"mlp": "swiglu", "d_ff": 192},
    {"position": "rotary", "rotary_dims": 8, "n_kv_heads": 2}, {"bias": False, "norm": "rmsnorm"},
    {"position": "alibi"},
])
def test_activation_count_is_what_autograd_keeps(change):
    """Two batch sizes: the difference per token leaves out what a layer keeps once (rotary tables)."""
    cfg = dataclasses.replace(M, kernels="fused", **change)
    torch.manual_seed(0)
    block = Block(cfg).to(torch.bfloat16)
    shape = (cfg.seq_len, cfg.d_model)
    per_token = (saved_bytes(block, (4, *shape)) - saved_bytes(block, (2, *shape))) / (2 * cfg.seq_len)
    assert per_token == layer_activation_bytes(cfg, 1, False, "bf16")


@pytest.mark.parametrize("change,tp,pp,partition", [
    ({}, 2, 2, "parameters"), ({"tied_embeddings": True}, 1, 3, "parameters"),
    ({}, 2, 2, "compute"), ({"tied_embeddings": True, "vocab_size": 8192}, 1, 2, "compute"),
    ({"mlp": "swiglu", "d_ff": 192, "n_kv_heads": 2, "bias": False}, 2, 4, "uniform"),
    ({"position": "rotary", "rotary_dims": 16, "norm": "rmsnorm"}, 4, 2, "type:Block"),
])
def test_stage_parameters_are_the_models(change, tp, pp, partition):
    """Each stage's parameters on one tp rank, against neox's own map of the model (ModelLayout: the
    pipeline's real partition over DeepSpeed's layer specs built on the meta device, TP_PLAN's shards)."""
    from math import prod

    from neox.parallel.model_layout import ModelLayout, Parallelism

    cfg = dataclasses.replace(M, **change)
    layout = ModelLayout(cfg, Parallelism(tp=tp, pp=pp, partition=partition))
    assert tuple(layout.parts) == stage_bounds(cfg, pp, partition)
    for st in stages(cfg, tp, pp, partition):
        assert st.params == sum(prod(layout.local_shape(p.name)) for _, p in layout.stage_params(st.index))


def test_tensor_parallel_activation_count_is_what_autograd_keeps(tmp_path):
    """Two CPU ranks over gloo shard one block (tp=2, sequence parallelism off and on); per token of the
    micro-batch, each keeps what layer_activation_bytes says."""
    import json

    from support.workers import run_workers
    from tp_activation_probe import fields, probe

    cfgs = [dataclasses.replace(M, kernels="fused", **change)
            for change in ({}, {"parallel_residual": True, "position": "rotary", "rotary_dims": 16})]
    out = tmp_path / "saved.json"
    run_workers(probe, 2, [fields(c) for c in cfgs], str(out))
    for cfg, got in zip(cfgs, json.loads(out.read_text())):
        assert got["False"] == layer_activation_bytes(cfg, 2, False, "bf16")
        # under sequence parallelism the norms are torch's, whose mean and rstd are bf16 on CPU (fp32 on
        # CUDA, as counted): 8 of the 16 bytes per token, over 2 ranks
        assert got["True"] == layer_activation_bytes(cfg, 2, True, "bf16") - 8 / 2


@pytest.mark.parametrize("model", ["tiny", "145B"])
def test_a_tied_embedding_is_counted_once_without_a_pipeline(model):
    """At pp=1 the tied head is the embedding itself (it once counted twice: +40% at tiny's shape)."""
    from neox.config.plan import gpt_config
    from neox.launch.compose import compose_config

    cfg = gpt_config(compose_config([f"model={model}"]).model)
    assert cfg.tied_embeddings
    assert stages(cfg, 1, 1)[0].params == count_params(cfg)["total"]


def test_make_plan_estimates_with_the_runs_partition_and_buckets(tmp_path):
    """make_plan's estimate (the summary, the RAM refusal) follows parallelism.pipe_partition and
    zero_bucket_size, as the planner's does (it once used the 'parameters' partition and 50M buckets always)."""
    from neox.config.plan import make_plan
    from neox.config.resources import Resources
    from neox.launch.compose import compose_config
    from neox.planner.memory import estimate as planner_estimate

    def both(extra):
        cfg = compose_config(["model=tiny", "parallelism=pp2", "parallelism.dp=2", "train.micro_batch=4",
                              f"run_dir={tmp_path}/run", *extra])
        plan = make_plan(cfg, Resources("local", "cpu", 4, 4))
        cand = Candidate(pp=2, dp=2, zero_stage=1, micro_batch=4, grad_accum=1,
                         partition=cfg.parallelism.pipe_partition)
        mem = planner_estimate(plan.model, cand, "fp32", fused_loss=plan.model.impl("cross_entropy") != "reference",
                               zero_bucket=cfg.parallelism.zero_bucket_size)
        return plan.memory.total, mem.states + max(mem.activations, mem.step_extra)

    for extra in ([], ["parallelism.pipe_partition=parameters"], ["parallelism.zero_bucket_size=1000"]):
        got, want = both(extra)
        assert got == pytest.approx(want), extra
    assert both(["parallelism.pipe_partition=parameters"])[0] != both([])[0]  # tiny: layers 0-2 | 3-6 vs 0-3 | 4-6


def test_compute_partition_balances_the_work_not_the_weights():
    """GPT-3 1.3B on 2 stages: a block does 12 d^2 + s d multiply-adds per token (its matmuls, and causal
    attention's half of 2 s d), the head V d, the embedding lookup none. By parameters the stages hold 12
    blocks | 12 blocks + head (the second does 16% more work); by work 13 | 11 + head."""
    from neox.config.plan import gpt_config
    from neox.launch.compose import compose_config
    from neox.planner.layout import layer_compute

    m = gpt_config(compose_config(["model=1.3B"]).model)
    d, s, V = 2048, 2048, 50304
    assert layer_compute(m) == [0] + [12 * d * d + s * d] * 24 + [0, V * d]
    assert stage_bounds(m, 2, "parameters") == (0, 13, 27) and stage_bounds(m, 2, "compute") == (0, 14, 27)
    work = layer_compute(m)
    def ratio(parts):
        per = [sum(work[parts[i]:parts[i + 1]]) for i in range(len(parts) - 1)]
        return max(per) / min(per)
    assert ratio(stage_bounds(m, 2, "parameters")) > 1.15 and ratio(stage_bounds(m, 2, "compute")) < 1.01


def test_compute_partition_keeps_a_block_on_every_stage():
    """A small model whose head outweighs its blocks would get a stage of the head alone: it falls back
    to equal block counts."""
    cfg = dataclasses.replace(M, vocab_size=8192, n_layers=2)
    work = [0, 1, 1, 0, 0]  # where the blocks are: layers 1 and 2
    parts = stage_bounds(cfg, 2, "compute")
    assert all(any(work[parts[i]:parts[i + 1]]) for i in range(2)), parts


def test_zero_slack_shrinks_once_the_freed_activations_can_hold_the_steps_buffers():
    """The allocator's slack: ZeRO-0 a fixed fraction; ZeRO-1..3 their stage's fraction while the activations are
    at most RESERVED_REUSE_RATIO times the optimizer step's buffers, then in proportion to step / activations."""
    from neox.planner import calibration as cal
    from neox.planner.memory import GiB, Memory

    def mem(zero: int, activations_gib: float, step_gib: float) -> Memory:
        return Memory(stage=0, terms={"weights": 10 * GiB, "activations": activations_gib * GiB},
                      step_extra=step_gib * GiB, context=0.0, zero_stage=zero)

    small, large = mem(1, 12, 4), mem(1, 96, 4)  # 3x and 24x the step's buffers
    assert small.step_reuse == 1.0 and large.step_reuse == pytest.approx(cal.RESERVED_REUSE_RATIO * 4 / 96)
    assert small.reserved == pytest.approx(small.allocated * (1 + cal.RESERVED_FRACTION[1]))
    assert large.reserved == pytest.approx(large.allocated * (1 + cal.RESERVED_FRACTION[1] * 12 / 96))
    for zero in (2, 3):
        assert mem(zero, 12, 4).reserved == pytest.approx(mem(zero, 12, 4).allocated * (1 + cal.RESERVED_FRACTION[zero]))
    zero0 = mem(0, 96, 4)  # no flat partitions: its fraction whatever the activations
    assert zero0.reserved == pytest.approx(zero0.allocated * (1 + cal.RESERVED_FRACTION[0]))


def test_the_fused_steps_chunk_is_the_planners():
    """The planner counts the fused bf16 step's fp32 gradients a chunk at a time: the chunk it assumes is the
    step's (neox.train sits above the planner, so the number is written twice)."""
    from neox.planner.memory import FUSED_STEP_CHUNK_ELEMENTS
    from neox.train.fused_step import CHUNK_ELEMENTS

    assert FUSED_STEP_CHUNK_ELEMENTS == CHUNK_ELEMENTS


@pytest.mark.parametrize("precision,pp,fused_step,whole", [("bf16", 1, True, False), ("fp8", 1, True, False),
                                                           ("fp16", 1, True, True), ("bf16", 2, True, True),
                                                           ("bf16", 1, False, True)])
def test_zero0_step_holds_fp32_gradients_a_chunk_at_a_time_in_the_fused_step(precision, pp, fused_step, whole,
                                                                            monkeypatch):
    """bf16/fp8 without a pipeline: neox's fused step (2^28 fp32 gradients at a time); fp16, the pipeline
    engine and train.fused_step=false: DeepSpeed's step, every gradient at once."""
    import neox.planner.memory as memory

    monkeypatch.setattr(memory, "FUSED_STEP_CHUNK_ELEMENTS", 1000)
    mem = one_stage(Candidate(pp=pp, micro_batch=2, grad_accum=4), precision=precision, fused_step=fused_step)
    params = sum(s.params for s in stages(M, 1, pp)[:1])
    extra = mem.step_extra - mem.terms.get("fp8 weight copies", 0.0) * (pp > 1)
    assert extra == pytest.approx(4 * (params if whole else 1000))
