"""The request against what the partition can give, checked before anything is submitted.

Slurm itself would either refuse such a job with a terse sbatch message, or (EnforcePartLimits=NO,
the default) queue it to pend forever with PartitionTimeLimit, PartitionNodeLimit or
PartitionConfig. `scontrol show partition` and `scontrol show node` say the limits; where they
cannot be read (another Slurm version, no permission) nothing is checked here and Slurm decides.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from neox.errors import LaunchError


@dataclass(frozen=True)
class Partition:
    name: str
    max_time_min: Optional[float]  # None: no limit
    max_nodes: Optional[int]  # None: no limit
    nodes: int  # nodes in the partition
    cpus_per_node: int  # the most CPUs any of its nodes has (or its MaxCPUsPerNode)
    gpus_per_node: int  # the most GPUs (gpu GRES) any of its nodes has


def _records(args: List[str]) -> List[Dict[str, str]]:
    """`scontrol -o show ...`: one record per line of Key=Value fields (values without spaces)."""
    res = subprocess.run(["scontrol", "-a", "-o", "show", *args], capture_output=True, text=True, timeout=60)
    if res.returncode:
        return []
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in res.stdout.splitlines() if line.strip()]


def minutes(text: str) -> Optional[float]:
    """Slurm's `[days-]hours:minutes:seconds` (or minutes) in minutes; None for UNLIMITED/INFINITE."""
    if not text or text.upper() in ("UNLIMITED", "INFINITE", "NONE"):
        return None
    days, _, clock = text.rpartition("-")
    parts = [float(p) for p in clock.split(":")]
    if len(parts) == 1:
        return parts[0] + 1440 * float(days or 0)
    h, m, s = ([0.0] * (3 - len(parts)) + parts)[-3:]
    return 1440 * float(days or 0) + 60 * h + m + s / 60


def gpus(gres: str) -> int:
    """GPUs in a node's Gres, e.g. 'gpu:8', 'gpu:h100:4(S:0-1),nvme:1' -> 8, 4; '(null)' -> 0."""
    total = 0
    for item in gres.split(","):
        fields = re.sub(r"\(.*?\)", "", item).split(":")
        if fields[0] == "gpu" and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def _limit(text: Optional[str]) -> Optional[int]:
    return int(text) if text and text.isdigit() else None


def find_partition(name: Optional[str]) -> Optional[Partition]:
    """The named partition (else the default one); None when Slurm does not say."""
    try:
        parts = _records(["partition"])
        nodes = _records(["node"])
    except (OSError, subprocess.SubprocessError):
        return None
    if not parts:
        return None
    if name:
        found = [p for p in parts if p.get("PartitionName") == name]
        if not found:
            names = ", ".join(p.get("PartitionName", "?") for p in parts)
            raise LaunchError(f"cluster.partition={name} is not a partition of this cluster "
                              f"(there are: {names}); set cluster.partition to one of them")
    else:
        found = [p for p in parts if p.get("Default") == "YES"]
        if not found:
            return None  # no default partition: sbatch says so itself
    part = found[0]
    pname = part["PartitionName"]
    members = [n for n in nodes if pname in n.get("Partitions", "").split(",")]
    cpus = max((int(n.get("CPUTot", 0) or 0) for n in members), default=0)
    if _limit(part.get("MaxCPUsPerNode")):
        cpus = min(cpus, int(part["MaxCPUsPerNode"])) if cpus else int(part["MaxCPUsPerNode"])
    return Partition(
        name=pname,
        max_time_min=minutes(part.get("MaxTime", "")),
        max_nodes=_limit(part.get("MaxNodes")),
        nodes=_limit(part.get("TotalNodes")) or len(members),
        cpus_per_node=cpus,
        gpus_per_node=max((gpus(n.get("Gres", "")) for n in members), default=0),
    )


def check_partition(cluster: Any, tpn: int, part: Optional[Partition]) -> None:
    """Raise LaunchError, naming the field and the limit, when the partition cannot run the job."""
    if part is None:
        return
    where = f"partition {part.name}"
    if part.max_time_min is not None and int(cluster.time_min) > part.max_time_min:
        limit = int(part.max_time_min)
        raise LaunchError(
            f"cluster.time_min={cluster.time_min} is above the MaxTime of {where} ({limit} min): "
            f"set cluster.time_min={limit} or less, or pick another cluster.partition"
        )
    nodes = int(cluster.nodes)
    most = min(n for n in (part.max_nodes, part.nodes) if n is not None)
    if nodes > most:
        why = f"MaxNodes={part.max_nodes}" if part.max_nodes is not None and part.max_nodes <= part.nodes \
            else f"{part.nodes} node(s)"
        raise LaunchError(f"cluster.nodes={nodes} is more than {where} allows ({why}): set cluster.nodes={most} "
                          "or less (and shrink the layout to match), or pick another cluster.partition")
    gpn = int(cluster.gpus_per_node)
    if gpn > part.gpus_per_node:
        if part.gpus_per_node == 0:
            raise LaunchError(f"cluster.gpus_per_node={gpn} but {where} has no GPUs (no gpu GRES on its nodes): "
                              "set cluster.gpus_per_node=0 for CPU tasks, or pick a GPU cluster.partition")
        raise LaunchError(f"cluster.gpus_per_node={gpn} but the nodes of {where} have at most "
                          f"{part.gpus_per_node} GPUs: set cluster.gpus_per_node={part.gpus_per_node}")
    need = tpn * int(cluster.cpus_per_task)
    if part.cpus_per_node and need > part.cpus_per_node:
        fit = part.cpus_per_node // tpn
        fix = f"set cluster.cpus_per_task={fit}" if fit else f"set cluster.tasks_per_node={part.cpus_per_node} or less"
        raise LaunchError(
            f"cluster.cpus_per_task={cluster.cpus_per_task} × {tpn} tasks per node = {need} CPUs per node, but the "
            f"nodes of {where} have at most {part.cpus_per_node}: {fix}"
        )
