"""Run a function on N real CPU processes over gloo, with a free port, a deadline and cleanup.

Workers are started with torch.multiprocessing (spawn); a worker's exception fails the test with
its traceback. Each worker gets OMP_NUM_THREADS=1 (2-core CI machine) and a process-group
timeout, so a mismatched collective raises instead of hanging for 30 minutes.
"""
from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from support.procs import free_port, no_shm_leak


def _entry(rank: int, fn: Callable, world: int, port: int, args: tuple, init: str) -> None:
    os.environ.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if init == "neox":  # the trainer's own init (DeepSpeed comm, collective timeout)
        from neox.train import distributed

        distributed.init(timeout_s=60)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    # Passed: leave without the interpreter's teardown. With a DeepSpeed engine built in the worker, a
    # C++ thread still joinable at static destruction sometimes aborts the finished process ("terminate
    # called without an active exception", SIGABRT; ~1 run in 4 of test_tp_deepspeed), which would
    # fail a test whose checks all passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_workers(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 120.0, init: str = "gloo") -> None:
    """Run fn(rank, world, *args) on `world` processes; raise if any fails or time runs out.
    init: "gloo" (a plain process group) or "neox" (the trainer's distributed.init)."""
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned children before torch import
    with no_shm_leak(f"the workers of {fn.__name__}"):
        ctx = mp.start_processes(_entry, args=(fn, world, free_port(), args, init), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} did not finish on {world} processes in {timeout} s")
        finally:
            for p in ctx.processes:  # only the processes this call started
                if p.is_alive():
                    p.kill()
                    p.join()
