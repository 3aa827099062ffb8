"""What a run can use: the slots (GPUs, or CPU processes) and how they sit on nodes.

Found before a launch by `neox.launch.resources.detect` (this machine, a hostfile, a Slurm request),
and inside a worker from the world the launcher actually started. The layout rule
(`neox.config.layout`) checks a layout against it.
"""
from __future__ import annotations

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

