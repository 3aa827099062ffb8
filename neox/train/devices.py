"""Where a worker's model is built, and how much memory it has used at its peak."""
from __future__ import annotations

import resource

import torch

from neox.config.plan import RunPlan


def build_device(plan: RunPlan, device: torch.device) -> torch.device:
    """Where the model is built (full, in fp32, before TP or ZeRO shard it): on the GPU, which initializes
    billions of weights in seconds where a CPU takes minutes, when this stage's full weights take at most half
    of the free memory; else on the CPU as before (only the shards, or DeepSpeed's bf16 copy, reach the GPU)."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if 4 * plan.params["total"] / plan.pp <= free / 2 else torch.device("cpu")


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB -> GiB)
