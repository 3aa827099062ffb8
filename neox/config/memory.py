"""The memory estimate `make_plan` checks a run against (refuse at 2x a device's memory, warn at 0.8x):
the planner's model (neox/planner/memory.py), so there is one memory model in neox.

`estimate` returns the most loaded pipeline stage's model states (weights, gradients, optimizer states,
DeepSpeed's buckets) and what comes and goes with each step (activations of the micro-batches in flight,
logits, pipeline buffers, or the optimizer step's fp32 gradients, whichever is larger). The planner's
report (`plan=true`) breaks both down and adds the allocator's and the CUDA context's share.
"""
from __future__ import annotations

from dataclasses import dataclass

from neox.model.gpt import GPTConfig

GiB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    states: float  # bytes per device: weights + gradients + optimizer states (+ ZeRO buckets)
    activations: float  # bytes per device for the micro-batches in flight (or the optimizer step's peak)

    @property
    def total(self) -> float:
        return self.states + self.activations


def estimate(m: GPTConfig, *, micro_batch: int, grad_accum: int, tp: int, pp: int, dp: int, zero_stage: int,
             precision: str, sequence_parallel: bool, partition: str, zero_bucket: int,
             fused_step: bool = True) -> MemoryEstimate:
    """Bytes one device of the most loaded stage needs (the planner counts each stage's own parameters)."""
    from neox.planner.layout import Candidate
    from neox.planner.memory import estimate as stage_estimate

    cand = Candidate(tp=tp, pp=pp, dp=dp, zero_stage=zero_stage, micro_batch=micro_batch, grad_accum=grad_accum,
                     checkpointing=m.activation_checkpointing == "full", sequence_parallel=sequence_parallel,
                     partition=partition)
    mem = stage_estimate(m, cand, precision, fused_loss=m.impl("cross_entropy") != "reference",
                         zero_bucket=int(zero_bucket), fused_step=fused_step)
    return MemoryEstimate(states=mem.states, activations=max(mem.activations, mem.step_extra))


def gib(n: float) -> str:
    return f"{n / GiB:.3g} GiB"
