"""What a worker says when training dies: out of memory is told apart from a failed collective, and
Ctrl-C ends a worker quietly (the launcher says what was kept). Its test makes memory run out with
NEOX_FAULT_OOM (neox.train.faults).
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Optional

from neox.errors import EXIT_INTERRUPTED  # re-exported: the worker's Ctrl-C status

# Substrings of the errors torch and the libraries under it raise when an allocation fails.
_OOM_MARKS = ("out of memory",  # CUDA ("CUDA out of memory", "CUDA error: out of memory"), NCCL
              "defaultcpuallocator: can't allocate memory", "defaultcpuallocator: not enough memory",
              "std::bad_alloc", "cublas_status_alloc_failed", "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    text = str(exc).lower()
    return any(mark in text for mark in _OOM_MARKS)


def out_of_memory_message(exc: BaseException, *, rank: int, step: Optional[int], device: str, micro_batch: int,
                          grad_accum: int, activation_checkpointing: str, tp: int, pp: int) -> str:
    """One line: where memory ran out, the allocator's words, and the settings that need less of it."""
    where = f"at step {step}" if step is not None else "while starting (model, engine, data)"
    cause = (str(exc).splitlines() or [type(exc).__name__])[0].strip() or type(exc).__name__
    fixes = [f"lower train.micro_batch (now {micro_batch}; raise train.grad_accum, now {grad_accum}, "
             "to keep the global batch)"]
    if activation_checkpointing != "full":
        fixes.append("set model.activation_checkpointing=full")
    fixes.append(f"or spread the model over more devices with parallelism.tp (now {tp}) or parallelism.pp "
                 f"(now {pp})")
    return (f"out of memory {where} on rank {rank} ({device}: {cause[:240]}); " + ", ".join(fixes))


def _leave(signum, frame) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe must not stop the exit
            pass
    os._exit(EXIT_INTERRUPTED)


def exit_quietly_on_interrupt() -> None:
    """Ctrl-C in a worker: leave at once, without a KeyboardInterrupt traceback per rank (or a
    "collective failed" from the ranks whose peer left first). Nothing is lost that a traceback
    would keep: checkpoints are written atomically, and the launcher reports the last one."""
    signal.signal(signal.SIGINT, _leave)
