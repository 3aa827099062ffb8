"""The steps between two training log lines, read without draining the GPU's queue.

A log line needs the window's mean loss (a device value, averaged over data-parallel ranks) and its
duration. Reading them at once means a host sync right after the optimizer step: the GPU then idles
while the host fetches the next batch and launches the next forward (on one H200, ~15 ms of a 1.05 s
1.4B step when the benches log every step). So on a GPU, `close` only queues the work: the all-reduce of
the losses, their copy to pinned host memory and a CUDA event; the duration is the GPU time between the
previous window's end event and this one (idle gaps included, as wall time would). `Closed.read` then
returns the numbers; the trainer calls it one step later, once the next step's work is queued, or right
away when something that syncs anyway follows (validation, a save, the end). On CPU everything is
synchronous and read at once. (The step's other per-step reads do not drain the queue either: the fused
optimizer step reads its norm with the update queued behind it, and the preemption watcher reads its NCCL
agreement one step late.)
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist


@dataclass
class Closed:
    """A closed window: `read()` gives (mean loss over the window and the dp ranks, seconds it took)."""

    loss_sum: torch.Tensor  # on the host (pinned, filled by a queued copy on a GPU)
    dp_size: int
    steps: int
    data_wait_s: float
    grad_norm: Any  # float, tensor or None: converted when read
    extras: dict  # host values taken when the window closed (lr, memory)
    done: Optional[torch.cuda.Event]  # the GPU finished the window's work; None on CPU
    began: Optional[torch.cuda.Event]
    host_seconds: float

    def read(self) -> tuple[float, float, float]:
        """(mean loss, seconds, grad norm as a float (nan when unknown))."""
        seconds = self.host_seconds
        if self.done is not None:
            self.done.synchronize()
            seconds = self.began.elapsed_time(self.done) / 1e3
        norm = self.grad_norm
        norm = float(norm) if norm is not None else float("nan")
        return self.loss_sum.item() / self.dp_size / self.steps, seconds, norm


class LogWindow:
    """Collects each step's loss and data wait until `close`; the next window starts where this one ended."""

    def __init__(self, device: torch.device, dp_group: Any, dp_size: int,
                 began: Optional[torch.cuda.Event] = None):
        self.device, self.dp_group, self.dp_size = device, dp_group, dp_size
        self.losses: List[torch.Tensor] = []
        self.data_wait_s = 0.0
        self.host_began = time.perf_counter()
        self.began = began
        if device.type == "cuda" and began is None:
            self.began = torch.cuda.Event(enable_timing=True)
            self.began.record()

    def add(self, loss: torch.Tensor, data_wait_s: float) -> None:
        self.losses.append(loss.detach().float())
        self.data_wait_s += data_wait_s

    def close(self, grad_norm: Any, **extras: float) -> tuple[Closed, "LogWindow"]:
        """Queue the window's reduction and return it with the next window (which begins now)."""
        loss_sum = torch.stack(self.losses).sum()
        dist.all_reduce(loss_sum, group=self.dp_group)  # tp ranks already agree on the loss
        done = None
        if self.device.type == "cuda":
            loss_sum = loss_sum.to("cpu", non_blocking=True)  # into pinned memory, behind the queued work
            if isinstance(grad_norm, torch.Tensor):
                grad_norm = grad_norm.detach().to("cpu", non_blocking=True)
            done = torch.cuda.Event(enable_timing=True)
            done.record()
        closed = Closed(loss_sum, self.dp_size, len(self.losses), self.data_wait_s, grad_norm, extras, done,
                        self.began, time.perf_counter() - self.host_began)
        return closed, LogWindow(self.device, self.dp_group, self.dp_size, began=done)
