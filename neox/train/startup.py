"""Where a run's start-up time goes, from `python launch.py` to the first optimizer step.

The local launcher exports its own start time (`NEOX_LAUNCHED_AT`, seconds since the epoch) to the workers
(a Slurm task counts from its own start: the queue is not start-up), and the time it started the deepspeed
launcher (`NEOX_SPAWNED_AT`), which splits the launcher phase into launch.py's part and DeepSpeed's;
each worker marks the end of each phase. Rank 0 prints one line and writes the phases to metrics.jsonl,
so the breakdown of every run is on record (bench/RESULTS.md's start-up table reads them).
"""
from __future__ import annotations

import os
import time
from typing import Dict, List, Optional, Tuple

from neox.config.run_files import LAUNCHED_AT, SPAWNED_AT


def launched_at(name: str = LAUNCHED_AT) -> Optional[float]:
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return None


def spawned_at() -> Optional[float]:
    return launched_at(SPAWNED_AT)


class StartupClock:
    """Phases in the order they happen; each lasts from the previous mark (or the clock's start) to its own."""

    def __init__(self, started: float, launched: Optional[float] = None, spawned: Optional[float] = None):
        """`started`: this process's start; `launched`: the launcher's, when it handed one over; `spawned`: when
        it started the deepspeed launcher (the launcher phase's two parts, reported beside the phases)."""
        self.phases: List[Tuple[str, float]] = []
        self.launcher_parts: Dict[str, float] = {}
        if launched is not None and launched <= started:
            self.phases.append(("launcher", started - launched))
            if spawned is not None and launched <= spawned <= started:
                self.launcher_parts = {"launch.py": spawned - launched, "deepspeed launcher": started - spawned}
        self._last = started

    def mark(self, phase: str) -> float:
        now = time.time()
        self.phases.append((phase, now - self._last))
        self._last = now
        return self.phases[-1][1]

    @property
    def total(self) -> float:
        return sum(seconds for _, seconds in self.phases)

    def line(self) -> str:
        split = ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.launcher_parts.items())
        parts = ", ".join(f"{name} {seconds:.1f}" + (f" ({split})" if name == "launcher" and split else "")
                          for name, seconds in self.phases)
        origin = "launch.py" if self.phases and self.phases[0][0] == "launcher" else "worker start"
        return f"start-up: {self.total:.1f} s from {origin} to the end of the first step ({parts})"

    def record(self) -> Dict[str, float]:
        """For metrics.jsonl under the `startup/` prefix."""
        parts = {f"launcher_{name.replace('.', '_').replace(' ', '_')}_s": round(seconds, 3)
                 for name, seconds in self.launcher_parts.items()}  # inside launcher_s, not added to the total
        return {**{f"{name}_s": round(seconds, 3) for name, seconds in self.phases}, "total_s": round(self.total, 3),
                **parts}
