"""Memory per GPU of the most loaded pipeline stage, term by term, as neox's training path holds it.

Model states (DeepSpeed 0.19 with torch's AdamW, as neox.train.engine configures it), bytes per local
parameter with w = 2 (bf16/fp16/fp8) or 4 (fp32):
    ZeRO-0   weights w, gradients w, fp32 master copy 4 (mixed precision only) + Adam m, v 8;
             at the step DeepSpeed's unfused fp16 optimizer makes an fp32 copy of every gradient (4), neox's
             fused bf16/fp8 step of 2^28 of them at a time (1 GiB)
    ZeRO-1   weights w, gradients w, (master 4 + m, v 8) / dp; at the step the fp32 gradient of the
             partition (4 / dp)
    ZeRO-2   weights w, (gradients w + master 4 + m, v 8) / dp, the step's fp32 gradient 4 / dp, buckets
    ZeRO-3   everything / dp, plus the gathered parameters of the layers in flight
(fp32 runs have no master copy; ZeRO-1/2/3 still keep an fp32 partition of the weights.)

Activations, counted from neox.model.gpt's forward for one layer and one token, in elements of w
bytes, with flash attention (causal SDPA keeps q, k, v, the output and an fp32 log-sum-exp per head):
    norms       the block input x and each norm's output (the next matmul keeps it), and the
                post-attention input of a sequential residual: 3h (parallel residual) or 4h
    attention   qkv (h + 2 kv) / t (rotary rotates it in place), GQA's copy of q h / t, SDPA's output h / t
                (flash attention writes it as [b, s, heads, hd], so the projection's input is a view of
                it), ALiBi's materialized scores a*s/t
    mlp         GeLU: pre-activation and output 2f / t; SwiGLU: both halves and output 3f / t
    dropout     one byte per element of each mask when dropout > 0
Sequence parallelism splits the norm terms over t but the colwise inputs are kept gathered (2 of h).
Full activation checkpointing keeps each block's input and one block recomputed at a time.
1F1B pipeline stage s holds min(pp - s, grad_accum) micro-batches in flight; the last stage adds the
logits (2 bytes per logit with the fused loss: its gradient is written in place; 14 with the
reference fp32 loss: an fp32 copy, its softmax and gradient). fp8 adds one byte per block weight: its
fp8 copy, made at the step's first forward and dropped before the optimizer step (after it under a
pipeline; not under ZeRO-3 or train.compile: the planner assumes the cache unless ZeRO-3).

What counting cannot know (the allocator's slack, the CUDA context, transient gradients inside a
layer's backward) is in neox/planner/calibration.py, with the measurement it came from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from neox.model.gpt import GPTConfig
from neox.planner import calibration as cal
from neox.planner.layout import Candidate, Stage, stages

GiB = 1024**3
FUSED_STEP_CHUNK_ELEMENTS = 1 << 28  # neox.train.fused_step.CHUNK_ELEMENTS (train sits above the planner)
PERSISTENT = ("weights", "gradients", "optimizer states", "communication buffers")


@dataclass(frozen=True)
class Memory:
    """Bytes on one GPU of `stage`, by term; `peak` is the largest the allocator holds at once."""
    stage: int
    terms: Dict[str, float]  # in the order a reader adds them up
    step_extra: float  # what the optimizer step adds after the activations are freed
    context: float  # outside the allocator (CUDA context, NCCL)
    apart: float = 0.0  # bytes of the terms that are never alive together (a recomputed block, the logits)
    zero_stage: int = 0

    @property
    def states(self) -> float:
        """Held for the whole run: model states and DeepSpeed's communication buffers."""
        return sum(v for k, v in self.terms.items() if k in PERSISTENT)

    @property
    def activations(self) -> float:
        """Held from a micro-batch's forward to its backward (freed before the optimizer step)."""
        return sum(v for k, v in self.terms.items() if k not in PERSISTENT) - self.apart

    @property
    def allocated(self) -> float:
        """Predicted torch.cuda.max_memory_allocated."""
        return self.states + max(self.activations, self.step_extra) + cal.ALLOCATED_EXTRA_BYTES

    @property
    def step_reuse(self) -> float:
        """The share of ZeRO's slack left when the optimizer step's buffers, allocated after the activations
        are freed, can go into those freed blocks: 1 until the activations outgrow the step's buffers
        RESERVED_REUSE_RATIO times, then in proportion (one micro-batch of 32 at 1.4B: almost none left)."""
        return min(1.0, cal.RESERVED_REUSE_RATIO * self.step_extra / max(self.activations, 1.0))

    @property
    def reserved(self) -> float:
        """Predicted torch.cuda.max_memory_reserved."""
        if self.zero_stage == 0:
            return self.allocated * (1 + cal.RESERVED_FRACTION[0])
        return self.allocated * (1 + cal.RESERVED_FRACTION[self.zero_stage] * self.step_reuse)

    @property
    def total(self) -> float:
        """What the GPU must hold: the allocator's reservation and everything outside it."""
        return self.reserved + self.context

    @property
    def peak_phase(self) -> str:
        return "optimizer step" if self.step_extra > self.activations else "forward/backward"

    def biggest_term(self) -> str:
        return max(self.terms, key=lambda k: self.terms[k])


def element_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def layer_activation_elements(m: GPTConfig, tp: int, sequence_parallel: bool) -> float:
    """Elements one block keeps for its backward, per token, on one tp rank (see the module docstring)."""
    h, f, kv = m.d_model, m.d_ff, m.n_kv_heads * m.head_dim
    replicated = (3 if m.parallel_residual else 4) * h
    if sequence_parallel and tp > 1:  # split along the sequence, but the two colwise inputs gathered
        replicated = (replicated - 2 * h) / tp + 2 * h
    sharded = (h + 2 * kv) + h  # qkv, SDPA output (= the projection's input)
    if m.n_heads != m.n_kv_heads:
        sharded += h  # GQA's q is copied out of qkv (MHA: q, k, v are views of it, rotated in place)
    if m.position == "alibi" or m.attn_dropout > 0:
        sharded += m.n_heads * m.seq_len  # scores materialized (per token: one row per head)
    sharded += (3 if m.mlp == "swiglu" else 2) * f
    return replicated + sharded / tp


def layer_activation_bytes(m: GPTConfig, tp: int, sequence_parallel: bool, precision: str) -> float:
    """Bytes one block keeps per token: elements, fp32 norm statistics, dropout masks."""
    w = element_bytes(precision)
    # each norm's mean and rstd (fp32), on its tokens; the parallel residual's two norms share theirs where
    # they run as one dual_norm (fused kernels, no sequence parallelism: neox.model.gpt.Block); under ZeRO-3 and
    # parallelism.tp_overlap the block keeps two norms, one [tokens] fp32 pair per layer more than counted here
    norm_op = "rms_norm" if m.norm == "rmsnorm" else "layer_norm"
    norms = 1 if m.parallel_residual and not sequence_parallel and m.impl(norm_op) != "reference" else 2
    stats = norms * 2 * 4 / (tp if sequence_parallel else 1)
    if m.position != "alibi":
        stats += m.n_heads / tp * 4  # flash attention's log-sum-exp per head (ALiBi keeps its scores instead)
    masks = 0.0
    if m.dropout > 0:
        masks += 2 * m.d_model / (tp if sequence_parallel else 1)
    if m.attn_dropout > 0:
        masks += m.n_heads * m.seq_len / tp
    return layer_activation_elements(m, tp, sequence_parallel) * w + stats + masks


def model_state_bytes(params: float, c: Candidate, precision: str) -> Dict[str, float]:
    """weights, gradients, optimizer states on one GPU holding `params` local parameters."""
    w = element_bytes(precision)
    mixed = precision != "fp32"
    master = 4 if (mixed or c.zero_stage >= 1) else 0  # ZeRO keeps an fp32 partition even in fp32
    moments = 8
    dp = c.dp
    if c.zero_stage == 0:
        return {"weights": params * w, "gradients": params * w, "optimizer states": params * (master + moments)}
    opt = params * (master + moments) / dp
    grads = params * w / dp if c.zero_stage >= 2 else params * w
    weights = params * w / dp if c.zero_stage == 3 else params * w
    return {"weights": weights, "gradients": grads, "optimizer states": opt}


def in_flight(stage: int, c: Candidate) -> int:
    """Micro-batches whose activations stage `stage` holds at once under DeepSpeed's 1F1B schedule."""
    if c.pp == 1:
        return 1
    return max(1, min(c.pp - stage, c.grad_accum))


def stage_memory(m: GPTConfig, c: Candidate, st: Stage, precision: str, fused_loss: bool = True,
                 zero_bucket: int = 50_000_000, fused_step: bool = True) -> Memory:
    """Every term for one stage (see the module docstring)."""
    w = element_bytes(precision)
    tokens = c.micro_batch * m.seq_len
    states = model_state_bytes(st.params, c, precision)
    per_layer = layer_activation_bytes(m, c.tp, c.sequence_parallel, precision) * tokens * cal.ACTIVATION_SCALE
    flying = in_flight(st.index, c)
    terms: Dict[str, float] = dict(states)
    recomputed = 0.0
    if c.checkpointing:
        kept = m.d_model * w * tokens / (c.tp if c.sequence_parallel else 1)  # each block's input
        recomputed = per_layer if st.blocks else 0.0
        terms["activations"] = st.blocks * flying * kept + recomputed
    else:
        terms["activations"] = st.blocks * flying * per_layer
    apart = 0.0
    if st.has_head:
        logit_bytes = 2 if fused_loss else 2 + 4 + 4 + 4
        # the final norm's input and output with the logits of one micro-batch
        terms["logits and loss"] = tokens * (m.vocab_size / c.tp * logit_bytes + 2 * m.d_model * w)
        # blocks are recomputed in the backward after the head's: never together with the logits
        apart = min(recomputed, terms["logits and loss"])
    copies = 0.0
    if precision == "fp8" and c.zero_stage < 3:  # each block weight's fp8 copy (about: the column-parallel
        # biases are counted too), held from the step's first forward to its last backward (Fp8Matmul)
        copies = terms["fp8 weight copies"] = sum(lp.sharded / c.tp for lp in st.layers if lp.kind == "block")
    if c.pp > 1:  # DeepSpeed's pipe buffers: inputs and outputs of max(2, in-flight) micro-batches
        boundary = tokens * m.d_model * w / (c.tp if c.sequence_parallel else 1)
        terms["pipeline buffers"] = 2 * max(2, flying) * boundary
    buffers = 0.0
    if c.zero_stage >= 1 and c.dp > 1:
        buffers = 2 * min(zero_bucket, st.params) * w  # reduce and all-gather buckets (nothing to reduce at dp 1)
    if c.zero_stage == 3:
        buffers += 2 * max((lp.local(c.tp) for lp in st.layers), default=0) * w  # the gathered layers
    if buffers:
        terms["communication buffers"] = buffers
    step_extra = 0.0
    if c.zero_stage == 0 and precision != "fp32":  # fp32 copies of the gradients for the optimizer: all of
        # them in DeepSpeed's unfused step (fp16, a pipeline), a chunk at a time in neox's fused one (bf16, fp8)
        fused = fused_step and precision in ("bf16", "fp8") and c.pp == 1  # train.fused_step
        step_extra = min(st.params, FUSED_STEP_CHUNK_ELEMENTS) * 4 if fused else st.params * 4
    if c.zero_stage in (1, 2):  # the partition's gradients flattened (bf16) and cast to fp32 for the step
        step_extra = st.params * (w + 4) / c.dp
    if c.zero_stage == 3:
        step_extra = st.params * 4 / c.dp
    if c.zero_stage == 0 and c.dp > 1:
        step_extra += min(st.params, 500_000_000) * w  # the flattened all-reduce bucket
    if c.pp > 1:  # the pipeline engine's step runs inside train_batch: the copies go only after it
        step_extra += copies
    groups = sum(1 for n in (c.tp, c.pp, c.dp) if n > 1)
    context = cal.CONTEXT_BYTES + groups * cal.NCCL_BYTES_PER_GROUP
    return Memory(st.index, terms, step_extra, context, apart, c.zero_stage)


def estimate(m: GPTConfig, c: Candidate, precision: str = "bf16", fused_loss: bool = True,
             zero_bucket: int = 50_000_000, fused_step: bool = True) -> Memory:
    """The stage whose GPUs need the most memory."""
    per_stage = [stage_memory(m, c, st, precision, fused_loss, zero_bucket, fused_step)
                 for st in stages(m, c.tp, c.pp, c.partition)]
    return max(per_stage, key=lambda mem: mem.total)
