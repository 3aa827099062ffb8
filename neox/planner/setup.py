"""What a plan is made for (model, precision, GPU, cluster) and the estimate of one layout on it.

`setup_from(cfg, res)` reads the run config and the launcher's resources; `evaluate(setup, cand)`
returns the memory of the most loaded stage, the step time and the verdict.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig

from neox.config.resources import Resources
from neox.errors import ConfigError
from neox.model.gpt import GPTConfig, count_params
from neox.planner import calibration as cal
from neox.planner import memory as memory_model
from neox.planner import step_time
from neox.planner.gpus import GiB, GpuSpec, resolve
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
        """Predicted above the card itself: a launch is refused (unless plan.force)."""
        return self.memory.total > self.gpu.memory

    @property
    def margin(self) -> float:
        """Bytes left on the card (negative: over)."""
        return self.gpu.memory - self.memory.total

    def verdict(self) -> str:
        mem = self.memory
        used = f"{mem.total / GiB:.1f} of {self.gpu.memory / GiB:.1f} GiB per GPU on a {self.gpu.name}"
        if self.fits:
            return f"fits: {used} ({self.margin / GiB:.1f} GiB to spare)"
        if not self.over:
            return (f"fits only just: {used}, above the {cal.FIT_FRACTION:.0%} the planner promises (its aim is 5%): "
                    "it may run out of memory")
        term = mem.biggest_term()
        return (f"does not fit: {used}; the biggest term is {term} ({mem.terms[term] / GiB:.1f} GiB)")


def evaluate(setup: Setup, cand: Candidate) -> Estimate:
    mem = memory_model.estimate(setup.model, cand, setup.precision, setup.fused_loss, setup.zero_bucket)
    t = step_time.estimate(setup.model, cand, setup.gpu, precision=setup.precision,
                           gpus_per_node=setup.gpus_per_node, intra_gbs=setup.intra_gbs,
                           inter_gbs=setup.inter_gbs, flops_per_token=setup.flops_per_token)
    return Estimate(cand, mem, t, setup.gpu)


def _detected_gpu(res: Resources) -> tuple:
    """(name, bytes) of this machine's GPU when the launch runs here on one."""
    if res.kind != "local" or res.device != "cuda":
        return None, None
    import torch

    return torch.cuda.get_device_name(0), res.memory_per_slot


def setup_from(cfg: DictConfig, res: Resources, gpus: Optional[int] = None) -> Setup:
    """The planner's view of a composed run config on `res` (the launcher's resources). Raises one
    line asking for cluster.gpu_memory_gb when nothing says the GPU's memory."""
    from neox.config.plan import flops_per_token, gpt_config

    cluster = cfg.cluster
    name, detected = _detected_gpu(res)
    gpu = resolve(cluster.get("gpu"), cluster.get("gpu_memory_gb"), name, detected)
    if gpu is None:
        where = {"local": "no GPU is visible here", "hostfile": "a hostfile does not say which GPUs its hosts have",
                 "slurm": "a Slurm request does not say which GPUs it gets"}.get(cluster.kind, "it is not known")
        raise ConfigError(f"the planner needs the GPU's memory and {where}: set cluster.gpu_memory_gb=<GiB per "
                          "GPU> (or cluster.gpu=H100|H200|A100-40GB|A100-80GB)")
    model = gpt_config(cfg.model)
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16"
    per_node = res.slots_per_node if res.device == "cuda" else 8
    if cluster.kind == "slurm":
        per_node = cluster.gpus_per_node or per_node
    total = gpus if gpus is not None else (res.slots if res.device == "cuda" else _planned_world(cfg))
    fused = model.impl("cross_entropy") != "reference"
    return Setup(model=model, model_name=str(cfg.model.name), precision=precision, gpu=gpu, gpus=total,
                 gpus_per_node=per_node, intra_gbs=float(cluster.get("intra_node_gbs") or 0.0),
                 inter_gbs=float(cluster.get("inter_node_gbs") or 0.0), steps=int(cfg.train.steps),
                 flops_per_token=flops_per_token(model, count_params(model)), fused_loss=fused,
                 zero_bucket=int(cfg.parallelism.zero_bucket_size))


def _planned_world(cfg: DictConfig) -> int:
    """GPUs of a run planned on a machine without them: cluster.gpus, else what the layout asks for."""
    if cfg.cluster.kind == "local" and cfg.cluster.gpus:
        return int(cfg.cluster.gpus)
    p = cfg.parallelism
    return p.tp * p.pp * (p.dp or 1)


def candidate_from(cfg: DictConfig, dp: int, micro: int, accum: int) -> Candidate:
    """The layout a config asks for by hand (dp and the batch as make_plan resolved them)."""
    p = cfg.parallelism
    return Candidate(tp=p.tp, pp=p.pp, dp=dp, zero_stage=p.zero_stage, micro_batch=micro, grad_accum=accum,
                     checkpointing=cfg.model.activation_checkpointing == "full",
                     sequence_parallel=bool(p.sequence_parallel), partition=str(p.pipe_partition))
