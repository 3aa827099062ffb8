"""What a run can use: the slots (GPUs, or CPU processes) and how they sit on nodes.

Found before a launch by `neox.launch.resources.detect` (this machine, a hostfile, a Slurm request),
and inside a worker by `from_worker_env` (the world the launcher actually started). The layout rule
(`neox.config.layout`) checks a layout against it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Resources:
    kind: str  # local | hostfile | slurm | worker
    device: str  # cuda | cpu
    slots: int  # GPUs (or CPU processes) available in all
    slots_per_node: int
    nodes: int = 1
    memory_per_slot: Optional[int] = None  # bytes one GPU (or CPU process) can use; None: not known here



def from_worker_env(device: str) -> Resources:
    """Inside a worker: the world the launcher actually started."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    return Resources("worker", device, world, local, nodes=max(1, world // max(local, 1)))
