"""What a run can use: the slots (GPUs, or CPU processes) and how they sit on nodes.

Found before a launch by `neox.launch.resources.detect` (this machine, a hostfile, a Slurm request),
and inside a worker by `from_worker_env` (the world the launcher actually started). The layout rule
(`neox.config.layout`) checks a layout against it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
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


def local_ranks() -> int:
    """Worker processes on this node (the launchers' LOCAL_WORLD_SIZE / LOCAL_SIZE; 1 outside a job)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1"))))


# cgroup v2, then v1: (limit, usage)
_CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def _read_int(path: str) -> Optional[int]:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def ram_bytes() -> int:
    """This machine's memory, or the container's limit (cgroup v2 or v1; a Slurm job's --mem) when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit, _ in _CGROUP_FILES:
        value = _read_int(limit)
        if value is not None:
            total = min(total, value)
    return total


def available_ram_bytes() -> Optional[int]:
    """Memory this process's container can still take without swapping or its OOM killer: the kernel's
    MemAvailable, capped by the cgroup's limit minus its usage. None where neither is known."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            avail = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in _CGROUP_FILES:
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None:
            room = max(cap - used, 0)
            avail = room if avail is None else min(avail, room)
    return avail
