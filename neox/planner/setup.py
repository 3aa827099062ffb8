"""What a plan is made for (model, precision, GPU, cluster) and the estimate of one layout on it.

`evaluate(setup, cand)` returns the memory of the most loaded stage, the step time and the verdict. The
launcher builds the `Setup` from the run config and its resources (neox/launch/planning.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from neox.model.gpt import GPTConfig
from neox.planner import calibration as cal
from neox.planner import memory as memory_model
from neox.planner import step_time
from neox.planner.gpus import GiB, GpuSpec
from neox.planner.layout import Candidate


@dataclass(frozen=True)
class Setup:
    model: GPTConfig
    model_name: str
    precision: str
    gpu: GpuSpec
    gpus: int  # GPUs the run may use in all
    gpus_per_node: int
    intra_gbs: float
    inter_gbs: float
    steps: int
    flops_per_token: float
    fused_loss: bool = True
    zero_bucket: int = 50_000_000
    fused_step: bool = True  # train.fused_step
    cluster_kind: str = "slurm"  # local | hostfile | slurm: how to ask for more GPUs


@dataclass(frozen=True)
class Estimate:
    candidate: Candidate
    memory: memory_model.Memory
    time: step_time.StepTime
    gpu: GpuSpec

    @property
    def budget(self) -> float:
        return cal.FIT_FRACTION * self.gpu.memory

    @property
    def fits(self) -> bool:
        """Within the share of the card the planner promises (what parallelism=auto picks from)."""
        return self.memory.total <= self.budget

    @property
    def over(self) -> bool:
        """Predicted above the card even before the allocator's slack: a launch is refused (unless
        plan.force). Between this and `fits` a launch goes on with a warning: the reserve is the least
        certain term, and refusing a run that would have fitted costs as much as an out-of-memory."""
        return self.memory.allocated + self.memory.context > self.gpu.memory

    @property
    def margin(self) -> float:
        """Bytes left on the card (negative: over)."""
        return self.gpu.memory - self.memory.total

    def verdict(self) -> str:
        mem = self.memory
        used = f"{mem.total / GiB:.1f} of {self.gpu.memory / GiB:.1f} GiB per GPU ({self.gpu.name})"
        if self.fits:
            return f"fits: {used}, {self.margin / GiB:.1f} GiB to spare"
        if not self.over and mem.total <= self.gpu.memory:
            return (f"fits only just: {used}, above the {cal.FIT_FRACTION:.0%} the planner promises (its aim is 5%): "
                    "it may run out of memory")
        if not self.over:
            bare = (mem.allocated + mem.context) / GiB
            return (f"may not fit: {used} with the allocator's reserve, {bare:.1f} GiB without it: it may run out "
                    "of memory")
        term = mem.biggest_term()
        return (f"does not fit: {used}; the biggest term is {term} ({mem.terms[term] / GiB:.1f} GiB)")


def evaluate(setup: Setup, cand: Candidate) -> Estimate:
    mem = memory_model.estimate(setup.model, cand, setup.precision, setup.fused_loss, setup.zero_bucket,
                                setup.fused_step)
    t = step_time.estimate(setup.model, cand, setup.gpu, precision=setup.precision,
                           gpus_per_node=setup.gpus_per_node, intra_gbs=setup.intra_gbs,
                           inter_gbs=setup.inter_gbs, flops_per_token=setup.flops_per_token)
    return Estimate(cand, mem, t, setup.gpu)
