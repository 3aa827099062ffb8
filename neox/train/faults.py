"""Fault injection for the tests of what a run does when things go wrong, read once from the environment.

The worker's entry calls `Faults.from_env()` and hands the result to the trainer; nothing in the
training loop reads the environment. With none of the variables set, `Faults()` injects nothing.

    NEOX_FAULT_NAN_STEPS=3,4       those steps' loss is NaN (the non-finite step guard skips them)
    NEOX_FAULT_HANG=<rank>:<step>  that rank sleeps forever at that step (the collective timeout names it)
    NEOX_FAULT_OOM=<step>          at that step, ask the allocator for 2**60 bytes: it fails at once with its
                                   own error (CPU: DefaultCPUAllocator, CUDA: torch.cuda.OutOfMemoryError)
                                   without using any memory
    NEOX_CHECKPOINT_FAULT=<point>@<step>  rank 0 is SIGKILLed at that point of that step's save
                                   (`neox.checkpoint.faults`: the manager calls it, never reads the variable)
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import FrozenSet, Mapping, Optional, Tuple

import torch

from neox.checkpoint.faults import FAULT_ENV, Fault, kill_at


@dataclass(frozen=True)
class Faults:
    nan_steps: FrozenSet[int] = frozenset()
    hang: Optional[Tuple[int, int]] = None  # (rank, step)
    oom_step: Optional[int] = None
    checkpoint: Optional[Fault] = None  # for rank 0's CheckpointManager

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Faults":
        nan = env.get("NEOX_FAULT_NAN_STEPS", "")
        hang = env.get("NEOX_FAULT_HANG", "")
        oom = env.get("NEOX_FAULT_OOM", "")
        try:
            rank_step = tuple(int(x) for x in hang.split(":")) if hang else None
            if rank_step is not None and len(rank_step) != 2:
                raise ValueError(hang)
            return cls(nan_steps=frozenset(int(s) for s in nan.split(",") if s.strip()), hang=rank_step,
                       oom_step=int(oom) if oom else None, checkpoint=kill_at(env.get(FAULT_ENV, "")))
        except ValueError:
            raise ValueError(f"malformed fault injection: NEOX_FAULT_NAN_STEPS={nan!r} (steps, e.g. 3,4), "
                             f"NEOX_FAULT_HANG={hang!r} (rank:step), NEOX_FAULT_OOM={oom!r} (a step)") from None

    def nan_at(self, step: int) -> bool:
        return step in self.nan_steps

    def maybe_hang(self, rank: int, step: int) -> None:
        if self.hang == (rank, step):
            print(f"fault injection: rank {rank} hangs at step {step}", flush=True)
            while True:
                time.sleep(3600)

    def maybe_oom(self, step: int, device: torch.device) -> None:
        if self.oom_step == step:
            torch.empty((1 << 60,), dtype=torch.uint8, device=device)
