"""Process-group setup for a worker: the launcher's env, a collective timeout, gloo on CPU, nccl on GPU."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _single_process_env() -> None:
    """Without a launcher, DeepSpeed looks for mpi4py; give it a one-process world instead."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def init(timeout_s: int) -> WorkerInfo:
    """Join the job's process group. A mismatched or dead peer raises after `timeout_s` instead of
    waiting DeepSpeed's default 30 minutes."""
    import importlib

    import deepspeed

    # `import deepspeed.comm.torch as m` would bind torch itself (deepspeed.comm re-exports it).
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    # DeepSpeed JIT-builds a CPU shared-memory all-reduce (~26 s, plus a 66 MB /dev/shm file per rank)
    # that only its inference path uses; training never calls it.
    ds_torch.build_shm_op = lambda: None
    _single_process_env()
    # Groups made later with new_group() (DeepSpeed's data-parallel group, our tp/pp groups) take
    # torch's module default of 30 minutes, not the world group's timeout; make it ours everywhere.
    c10d = importlib.import_module("torch.distributed.distributed_c10d")
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timedelta(seconds=timeout_s)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        # Clusters that bind one GPU per task show each rank a single device.
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device, backend = torch.device("cuda", torch.cuda.current_device()), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s), verbose=False)
    return WorkerInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def shutdown() -> None:
    """Leave the process group cleanly after a finished run: exiting with it still alive lets
    torch's communication threads be torn down mid-flight (seen as `terminate called without an
    active exception` and exit code -6 on CPU)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

