"""The few collectives a checkpoint needs, which also work in a single process without a process group
(tools that read or list checkpoints, in-process tests)."""
from __future__ import annotations

from typing import Any, List

import torch.distributed as dist


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather(obj: Any) -> List[Any]:
    rank, size = world()
    if size == 1:
        return [obj]
    out: List[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    rank, size = world()
    if size == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
