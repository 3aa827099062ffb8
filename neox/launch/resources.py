"""What a launch can use: this machine's GPUs (or CPU processes), a hostfile's slots, or a Slurm job."""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import DictConfig

from neox.config.domains import check_domains
from neox.config.resources import Resources, ram_bytes
from neox.config.schema import CLUSTER_SCHEMAS, LocalCluster
from neox.errors import LaunchError

_HOSTFILE_LINE = re.compile(r"^(?P<host>[A-Za-z0-9._-]+)\s+slots=(?P<slots>\S+)$")


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


def parse_hostfile(path: str, resolve: bool = True) -> List[Host]:
    """Parse `host slots=N` lines (blank lines and # comments allowed); every problem names its line."""
    file = Path(os.path.expanduser(path))
    if not file.is_file():
        raise LaunchError(f"hostfile {file} does not exist; write one `host slots=N` per line or set cluster.hostfile")
    hosts: Dict[str, Host] = {}
    for lineno, raw in enumerate(file.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"hostfile {file}:{lineno}"
        match = _HOSTFILE_LINE.match(line)
        if not match:
            raise LaunchError(f"{where}: {raw.strip()!r} is not `host slots=N`; fix that line")
        name, slots = match["host"], match["slots"]
        if not slots.isdigit() or int(slots) < 1:
            raise LaunchError(f"{where}: slots={slots!r} must be a positive integer")
        if name in hosts:
            raise LaunchError(f"{where}: host {name} is listed twice; keep one line per host")
        if resolve:
            try:
                socket.gethostbyname(name)
            except OSError:
                raise LaunchError(f"{where}: unknown host {name!r} (it does not resolve); fix the name") from None
        hosts[name] = Host(name, int(slots))
    if not hosts:
        raise LaunchError(f"hostfile {file} lists no hosts; write one `host slots=N` per line")
    return list(hosts.values())


def _gpu_ids(spec: Optional[str], what: str, present: int) -> List[int]:
    if spec is None:
        return []
    ids = []
    for part in str(spec).replace("localhost:", "").split(","):
        part = part.strip()
        if not part.isdigit():
            raise LaunchError(f"cluster.{what}={spec!r} must list GPU ids like 0,1")
        if int(part) >= present:
            raise LaunchError(f"cluster.{what}={spec!r} names GPU {part}, but only {present} GPUs are visible")
        ids.append(int(part))
    return ids


def gpu_memory_bytes(ids: List[int]) -> int:
    import torch

    return min(torch.cuda.get_device_properties(i).total_memory for i in ids)


def local_gpu_count() -> int:
    import torch  # deferred: importing torch costs ~1-2 s, only the launch path needs it

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_gpu_selection(cluster: LocalCluster | DictConfig, present: int) -> List[int]:
    """The GPU ids a local run uses, from include/exclude/gpus (CUDA_VISIBLE_DEVICES already applies).
    `cluster`: the plan's typed section, or the raw one `detect` plans with."""
    chosen = list(range(present))
    include = _gpu_ids(cluster.include, "include", present)
    exclude = _gpu_ids(cluster.exclude, "exclude", present)
    if include:
        chosen = include
    chosen = [g for g in chosen if g not in exclude]
    if cluster.gpus is not None:
        if cluster.gpus > len(chosen):
            raise LaunchError(f"cluster.gpus={cluster.gpus} asks for more GPUs than the {len(chosen)} present here; "
                              "lower it, or run on a machine with more GPUs")
        chosen = chosen[: cluster.gpus]
    return chosen


def detect(cluster: DictConfig) -> Resources:
    """The resources a launch with this cluster config can use (memory only where it is measurable here)."""
    if cluster.kind in CLUSTER_SCHEMAS:  # domains first: gpus=-1 or cpu_procs=0 would be sliced or divided
        check_domains(cluster, CLUSTER_SCHEMAS[cluster.kind], "cluster.")
    if cluster.kind == "local":
        present = local_gpu_count()
        if present == 0:
            if cluster.include or cluster.exclude or cluster.gpus:
                raise LaunchError("cluster.gpus/include/exclude select GPUs, but this machine has none; "
                                  "drop them to run CPU processes (cluster.cpu_procs)")
            procs = cluster.cpu_procs
            return Resources("local", "cpu", procs, procs, memory_per_slot=ram_bytes() // procs)
        ids = local_gpu_selection(cluster, present)
        if not ids:
            raise LaunchError("cluster.include/exclude leave no GPU to run on")
        return Resources("local", "cuda", len(ids), len(ids), memory_per_slot=gpu_memory_bytes(ids))
    if cluster.kind == "hostfile":
        hosts = parse_hostfile(cluster.hostfile)
        per_node = min(h.slots for h in hosts)
        return Resources("hostfile", "cuda", sum(h.slots for h in hosts), per_node, nodes=len(hosts))
    if cluster.kind == "slurm":
        gpus = cluster.gpus_per_node
        per_node = cluster.tasks_per_node or (gpus if gpus > 0 else 1)
        if gpus > 0 and per_node > gpus:
            raise LaunchError(f"cluster.tasks_per_node={per_node} exceeds cluster.gpus_per_node={gpus}")
        return Resources("slurm", "cuda" if gpus > 0 else "cpu", per_node * cluster.nodes, per_node, nodes=cluster.nodes)
    raise LaunchError(f"cluster.kind={cluster.kind!r} is not local, hostfile or slurm")

