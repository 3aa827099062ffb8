"""Guards against bad steps and dead peers.

- `SkipNonFiniteAdamW`: torch AdamW that skips (and counts) any step whose gradients are not all
  finite on every rank. DeepSpeed calls `step()` on every rank at the same point (ZeRO hands each rank
  its partition), so one all-reduce makes all ranks agree.
- `Heartbeats`: each rank touches a file per step, so when a collective times out the survivors
  can name the rank that stopped.

Their tests inject the faults through `neox.train.faults`.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import torch
import torch.distributed as dist


class SkipNonFiniteAdamW(torch.optim.AdamW):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_events = 0  # calls that skipped (ZeRO calls once per parameter group)

    @torch.no_grad()
    def grads_finite(self) -> bool:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        if grads:
            norms = torch._foreach_norm(grads)
            ok = torch.isfinite(torch.stack([n.float() for n in norms]).sum()).to(torch.float32)
        else:
            ok = torch.ones((), device=device)
        if dist.is_initialized():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def step(self, closure=None):
        if not self.grads_finite():
            self.skip_events += 1
            self.zero_grad(set_to_none=True)
            return None
        return super().step(closure)


class Heartbeats:
    def __init__(self, run_dir: Path, rank: int):
        self.folder = run_dir / "heartbeats"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.file = self.folder / f"rank{rank}"
        self.rank = rank

    def beat(self, step: int) -> None:
        self.file.write_text(str(step))

    def stalled(self) -> List[int]:
        """Ranks that have not entered the step the furthest rank is in."""
        steps = {}
        for f in self.folder.glob("rank*"):
            try:
                steps[int(f.name[4:])] = int(f.read_text() or -1)
            except (OSError, ValueError):
                continue
        if not steps:
            return []
        top = max(steps.values())
        return sorted(r for r, s in steps.items() if s < top)

