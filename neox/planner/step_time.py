"""Time of one optimizer step: compute from a calibrated per-GPU rate, communication from an
interconnect model, and the pipeline bubble.

For the busiest pipeline stage, one micro-batch costs
    matmuls       its FLOPs (6 per parameter per token, attention's QK^T and AV halved for the causal
                  mask, the forward again under activation checkpointing) / (peak x matmul efficiency,
                  which falls for small local matmuls: tokens x d / tp)
    elementwise   bytes moved by memory-bound ops, proportional to the activations it keeps, / HBM bandwidth
    tensor par.   4 collectives per block (2 forward, 2 backward; 6 when checkpointed) of tokens x d
                  elements: latency + 2 (t-1)/t x bytes / (link bandwidth x efficiency), not overlapped
the first two never less than the host's time to launch them (per layer, calibrated); ZeRO-2/3 add
their per-layer hook time (calibrated). A pipeline runs
(m + p - 1) such slots per step (1F1B: the bubble is the p - 1), plus the point-to-point sends at
each boundary. The data-parallel reduction: one all-reduce per step (ZeRO-0/1), a reduce-scatter per
micro-batch (ZeRO-2/3, which partition the gradients), and the weights all-gathered once per step
(ZeRO-1/2, whose optimizer updates a partition) or twice per micro-batch (ZeRO-3). Once per step: the optimizer's pass over its states at HBM
speed, and a fixed overhead.
tp and pp groups stay inside a node when they fit in one (neox's layout rule keeps tp there); dp
crosses nodes whenever the world does.
"""
from __future__ import annotations

from dataclasses import dataclass

from neox.model.gpt import GPTConfig
from neox.planner import calibration as cal
from neox.planner.gpus import GpuSpec
from neox.planner.layout import Candidate, Stage, stages
from neox.planner.memory import element_bytes, layer_activation_bytes


@dataclass(frozen=True)
class StepTime:
    compute: float  # seconds of the step in the busiest stage's micro-batches (bubble included)
    bubble: float  # of which the pipeline's idle slots
    tp_comm: float  # of `compute`: tensor-parallel collectives
    pp_comm: float  # point-to-point sends between stages
    dp_comm: float  # exposed data-parallel reduction (and ZeRO-3 gathers)
    optimizer: float
    overhead: float
    tokens_per_step: int
    flops_per_token: float  # the training log's convention (attention in full), for MFU
    world: int
    peak_tflops: float

    @property
    def step(self) -> float:
        return self.compute + self.pp_comm + self.dp_comm + self.optimizer + self.overhead

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step

    @property
    def mfu(self) -> float:
        return self.flops_per_token * self.tokens_per_s / self.world / (self.peak_tflops * 1e12)


def collective_time(nbytes: float, group: int, bandwidth_gbs: float, kind: str = "all_reduce") -> float:
    """Ring collective on `group` ranks: all-reduce moves 2 (n-1)/n of the bytes, the others (n-1)/n."""
    if group <= 1 or nbytes <= 0:
        return 0.0
    share = (2 if kind == "all_reduce" else 1) * (group - 1) / group
    return cal.COMM_LATENCY_S + share * nbytes / (bandwidth_gbs * 1e9 * cal.COMM_EFFICIENCY)


def block_flops_per_token(m: GPTConfig) -> float:
    """Forward + backward FLOPs of one block per token: 6 per matmul weight, attention causal-halved."""
    h, f, hd = m.d_model, m.d_ff, m.head_dim
    qkv = h * (m.n_heads + 2 * m.n_kv_heads) * hd
    weights = qkv + m.n_heads * hd * h + h * f * (2 if m.mlp == "swiglu" else 1) + f * h
    return 6 * weights + 6 * h * m.seq_len


def micro_batch_time(m: GPTConfig, c: Candidate, st: Stage, gpu: GpuSpec, precision: str,
                     intra_gbs: float, inter_gbs: float, gpus_per_node: int) -> tuple:
    """(seconds, of which tp collectives) for one micro-batch's forward and backward on stage `st`."""
    tokens = c.micro_batch * m.seq_len
    recompute = 4 / 3 if c.checkpointing else 1.0
    flops = tokens * st.blocks * block_flops_per_token(m) * recompute / c.tp
    if st.has_head:
        flops += tokens * 6 * m.vocab_size * m.d_model / c.tp
    work = tokens * m.d_model / c.tp  # one local matmul's rows x columns
    eff = cal.MATMUL_EFFICIENCY * work / (work + cal.MATMUL_HALF_WORK)
    t_matmul = flops / (gpu.peak_tflops * 1e12 * eff)
    act = layer_activation_bytes(m, c.tp, c.sequence_parallel, precision) * tokens * st.blocks * recompute
    if st.has_head:
        act += tokens * m.vocab_size / c.tp * 2
    t_elem = cal.ELEMENTWISE_TRAFFIC * act / (gpu.hbm_gbs * 1e9)
    t_tp = 0.0
    if c.tp > 1:
        bw = intra_gbs if c.tp <= gpus_per_node else inter_gbs
        per = tokens * m.d_model * element_bytes(precision)
        collectives = (6 if c.checkpointing else 4) * st.blocks
        t_tp = collectives * collective_time(per, c.tp, bw)
        if c.sequence_parallel:  # measured slower than the all-reduces they replace (calibration.py)
            t_tp *= cal.SEQUENCE_PARALLEL_TP_FACTOR
    t_host = (st.blocks + 2) * cal.HOST_SECONDS_PER_LAYER * recompute
    # ZeRO-2/3's hooks on every parameter (bucketing gradients; ZeRO-3 gathering and releasing weights)
    t_zero = (st.blocks + 2) * cal.ZERO_SECONDS_PER_LAYER.get(c.zero_stage, 0.0)
    return max(t_matmul + t_elem, t_host) + t_tp + t_zero, t_tp  # a collective waits for both ranks: never hidden


def estimate(m: GPTConfig, c: Candidate, gpu: GpuSpec, *, precision: str = "bf16", gpus_per_node: int = 8,
             intra_gbs: float = 0.0, inter_gbs: float = 0.0, flops_per_token: float = 0.0) -> StepTime:
    """The step time of `c` (intra/inter bandwidth 0: the GPU's defaults)."""
    intra = intra_gbs or gpu.intra_node_gbs
    inter = inter_gbs or gpu.inter_node_gbs
    all_stages = stages(m, c.tp, c.pp, c.partition)
    times = [micro_batch_time(m, c, st, gpu, precision, intra, inter, gpus_per_node) for st in all_stages]
    slowest, tp_comm = max(times)
    slots = c.grad_accum + c.pp - 1
    compute = slots * slowest
    bubble = (c.pp - 1) * slowest
    w = element_bytes(precision)
    tokens = c.micro_batch * m.seq_len
    pp_comm = 0.0
    if c.pp > 1:
        bw = intra if c.tp * c.pp <= gpus_per_node else inter
        boundary = tokens * m.d_model * w / (c.tp if c.sequence_parallel else 1)
        pp_comm = slots * 2 * (cal.COMM_LATENCY_S + boundary / (bw * 1e9 * cal.COMM_EFFICIENCY))
    params = max(st.params for st in all_stages)
    dp_bw = intra if c.world <= gpus_per_node else inter
    grads = params * w
    if c.zero_stage <= 1:  # one all-reduce of the accumulated gradients per step
        dp = collective_time(grads, c.dp, dp_bw, "all_reduce")
    else:  # every micro-batch's gradients are reduce-scattered into the partitions
        dp = c.grad_accum * collective_time(grads, c.dp, dp_bw, "reduce_scatter")
    if c.zero_stage in (1, 2):  # the updated weights all-gathered once per step (DeepSpeed's stage_1_and_2)
        dp += collective_time(params * w, c.dp, dp_bw, "all_gather")
    if c.zero_stage == 3:  # the weights gathered for every micro-batch's forward and backward
        dp += 2 * c.grad_accum * collective_time(params * w, c.dp, dp_bw, "all_gather")
    dp_comm = dp * (1 - cal.DP_OVERLAP.get(c.zero_stage, 0.0))
    opt_params = params / (c.dp if c.zero_stage >= 1 else 1)
    optimizer = opt_params * cal.OPTIMIZER_BYTES_PER_PARAM / (gpu.hbm_gbs * 1e9)
    return StepTime(compute=compute, bubble=bubble, tp_comm=tp_comm * slots, pp_comm=pp_comm, dp_comm=dp_comm,
                    optimizer=optimizer, overhead=cal.STEP_OVERHEAD_S, tokens_per_step=c.global_batch * m.seq_len,
                    flops_per_token=flops_per_token, world=c.world, peak_tflops=gpu.peak_tflops)
