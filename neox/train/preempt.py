"""Stop cleanly when the cluster asks: preemption, time limit, `scontrol requeue`.

Slurm warns a job before it takes the allocation away: SIGUSR2 `signal_delay_s` before the time
limit (`--signal=USR2@N`, set by neox.launch.slurm, or `scancel --signal=USR2`), SIGTERM on
preemption, requeue or cancel (then SIGKILL after the cluster's KillWait; SIGTERM is watched only
inside a Slurm job, elsewhere it still ends the process at once). The trainer makes one
`PreemptionWatcher` and asks it at every step boundary whether to stop:

    watcher = PreemptionWatcher()
    for step in ...:
        train_step()
        if watcher.should_stop():          # every rank gets the same answer at the same step
            save_checkpoint(step)          # collective
            return EXIT_REQUEUE
    watcher.close()

The signal handlers only set a flag; nothing is saved or exited inside a handler, since a save
is collective and a handler runs on one rank at an arbitrary point. `should_stop` all-reduces the
flag (MAX) over the world, so the ranks that got no signal (or got it a moment later) stop at the
same step as the ones that did. The launcher (neox.launch.slurm) requeues the job when the
trainer returns EXIT_REQUEUE, and the requeued job resumes from the run dir's latest checkpoint.

Cost: one all-reduce of a single int per check. A world of one rank communicates nothing. On NCCL the
agreement is read one check late: a flag reduced on the GPU can only be read after all the work queued
before it (the optimizer step), which would leave the GPU idle while the host then launches the next
forward; so each check queues its reduction and a pinned copy of the result, and answers with the
previous check's, long done by then. Every rank still gets the same answer at the same call; a stop
comes one step later. Checking every step gives the fastest answer to SIGTERM, which may be followed by
SIGKILL in as little as KillWait (30 s by default); pass `every=k` to reduce the flag only on every k-th
call (all ranks count calls the same way, so they still agree), at the price of reacting up to k steps
later.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

from neox.errors import EXIT_REQUEUE  # noqa: F401 - re-exported: the Slurm launcher requeues on it



def default_signals() -> Tuple[int, ...]:
    """USR2 always; SIGTERM only inside a Slurm job, where it announces preemption or requeue and
    SIGKILL follows only after KillWait. Elsewhere SIGTERM keeps meaning "stop now" (e.g. the
    deepspeed launcher ending the other ranks after one died)."""
    if "SLURM_JOB_ID" in os.environ:
        return (signal.SIGUSR2, signal.SIGTERM)
    return (signal.SIGUSR2,)


_Handler = Union[Callable[[int, Optional[FrameType]], object], int, None]


def _chains_to(previous: _Handler) -> bool:
    """Whether a handler installed before ours should still run after ours sets the flag.

    Default/ignore dispositions are not chained (SIG_DFL on SIGTERM would kill the process
    before it can save). submitit's USR2 handler (`checkpoint_and_try_requeue`) is not chained
    either: on rank 0 it requeues and exits at once, skipping the collective save. Any other
    Python handler (e.g. submitit's SIGTERM `bypass`, which only logs) still runs.
    """
    if not callable(previous):
        return False
    owner = getattr(previous, "__self__", None)
    if owner is not None and type(owner).__module__.startswith("submitit"):
        return getattr(previous, "__name__", "") == "bypass"
    return True


class PreemptionWatcher:
    """Turns stop signals into a flag that every rank agrees on at a step boundary.

    Create it once per process, in the main thread, after any other signal handlers (e.g.
    submitit's) are installed. `signals`: default USR2, plus SIGTERM inside a Slurm job.
    `every`: all-reduce the flag only on every k-th `should_stop` call. `lagged`: answer each reducing call
    with the previous one's reduction (None: where the group is NCCL; see the module's note).
    """

    def __init__(self, signals: Optional[Sequence[int]] = None, every: int = 1,
                 lagged: Optional[bool] = None) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every, self.lagged = every, lagged
        self._pending: Optional[tuple] = None  # (host copy of a queued reduction, its CUDA event or None)
        self.signal_name: Optional[str] = None  # the first signal that arrived
        self._flag = False
        self._agreed = False
        self._calls = 0
        self._previous: Dict[int, _Handler] = {}
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionWatcher must be created in the main thread (signal handlers)")
        for sig in default_signals() if signals is None else signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if not self._flag:
            self.signal_name = signal.Signals(signum).name
            print(
                f"[neox] rank {os.environ.get('RANK', '0')}: got {self.signal_name}; "
                "will save a checkpoint and stop at the next step boundary",
                file=sys.stderr,
                flush=True,
            )
        self._flag = True
        previous = self._previous.get(signum)
        if _chains_to(previous):
            previous(signum, frame)  # type: ignore[operator]

    @property
    def requested(self) -> bool:
        """Whether this process got a stop signal (no communication)."""
        return self._flag

    def request(self) -> None:
        """Ask for a stop as if a signal had come (tests, or a trainer's own time budget)."""
        self._flag = True
        self.signal_name = self.signal_name or "request"

    def should_stop(self, group=None) -> bool:
        """Call at every step boundary on every rank; True on all ranks at the same call.

        Once True it stays True. Without an initialized torch.distributed, or in a group of one rank,
        it is the local flag.
        """
        if self._agreed:
            return True
        self._calls += 1
        if self._calls % self.every:
            return False
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            self._agreed = self._flag
            return self._agreed
        import torch

        nccl = dist.get_backend(group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        flag = torch.tensor([1 if self._flag else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if not (nccl if self.lagged is None else self.lagged):
            self._agreed = bool(flag.item())
            return self._agreed
        previous, self._pending = self._pending, self._queued_read(flag)
        if previous is not None:
            host, done = previous
            if done is not None:
                done.synchronize()  # recorded a step ago: long done
            self._agreed = bool(host.item())
        return self._agreed

    @staticmethod
    def _queued_read(flag) -> tuple:
        """A host copy of `flag` that fills in behind the queued work, and the event that says it has."""
        import torch

        if not flag.is_cuda:
            return flag.clone(), None
        host = flag.to("cpu", non_blocking=True)  # pinned, queued behind the all-reduce
        done = torch.cuda.Event()
        done.record()
        return host, done

    def close(self) -> None:
        """Put back the handlers that were there before."""
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "PreemptionWatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
