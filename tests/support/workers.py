"""Run a function on N real CPU processes over gloo, with a free port, a deadline and cleanup;
`Checks` runs several such functions in one spawn and gives each test its own outcome.

Workers are started with torch.multiprocessing (spawn); a worker's exception fails the test with
its traceback. Each worker gets OMP_NUM_THREADS=1 (2-core CI machine) and a process-group
timeout, so a mismatched collective raises instead of hanging for 30 minutes.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, List, Tuple

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
    port = free_port()
    with no_shm_leak(f"the workers of {fn.__name__}", ports=lambda: [port]):
        ctx = mp.start_processes(_entry, args=(fn, world, port, args, init), nprocs=world,
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


def _checks_entry(rank: int, world: int, checks: List[Tuple[str, Callable, tuple]], out_dir: str) -> None:
    """Run each check in turn on every rank; record "ok" or the traceback per check and rank. After a
    failure on any rank the ranks may be out of step in their collectives: the rest are not run."""
    failed = None
    for name, fn, args in checks:
        path = Path(out_dir) / f"{name}.rank{rank}.outcome"
        if failed is not None:
            path.write_text(f"not run: check {failed!r} failed before it in the same processes")
            continue
        try:
            fn(rank, world, *args)
            status = "ok"
        except BaseException:  # noqa: BLE001 - reported to the test that owns the check
            status = traceback.format_exc()
        path.write_text(status)
        flag = torch.tensor([0.0 if status == "ok" else 1.0])
        dist.all_reduce(flag)  # every rank learns whether a peer failed
        if flag.item():
            failed = name


class Checks:
    """Several multi-process checks run in one spawn of `world` processes (a spawn costs seconds of
    imports per process on 2 cores); each test asks for its own check's outcome."""

    def __init__(self, world: int, out_dir: Path) -> None:
        self.world, self.out_dir = world, Path(out_dir)
        self.checks: List[Tuple[str, Callable, tuple]] = []

    def add(self, name: str, fn: Callable[..., Any], *args: Any) -> "Checks":
        """fn(rank, world, *args): a module-level function (spawn pickles it by name)."""
        self.checks.append((name, fn, args))
        return self

    def dir(self, name: str) -> Path:
        """A folder of this check's own, for what it writes."""
        path = self.out_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def run(self, timeout: float, init: str = "gloo") -> "Checks":
        run_workers(_checks_entry, self.world, self.checks, str(self.out_dir), timeout=timeout, init=init)
        return self

    def outcome(self, name: str) -> None:
        """Fail the calling test with the check's traceback (from the first rank that failed)."""
        for rank in range(self.world):
            path = self.out_dir / f"{name}.rank{rank}.outcome"
            status = path.read_text() if path.exists() else "no outcome recorded"
            if status != "ok":
                raise AssertionError(f"check {name!r} on rank {rank} of {self.world}:\n{status}")
