"""The checkpoint's test seam: a SIGKILL of rank 0 at a named point of one save.

`CheckpointManager` calls its `fault(point, step)` at each of FAULT_POINTS of every save; it never
reads the environment. The worker parses NEOX_CHECKPOINT_FAULT=<point>@<step> once at its entry
(`kill_at`) and passes the result to rank 0's manager.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable, Optional

from neox.errors import ConfigError

FAULT_ENV = "NEOX_CHECKPOINT_FAULT"
# after every rank wrote its files; after the manifest, before the rename; after the rename, before `latest`
FAULT_POINTS = ("after_shards", "before_rename", "before_latest")
Fault = Callable[[str, int], None]


def kill_at(spec: str) -> Optional[Fault]:
    """A fault that SIGKILLs this process at `<point>@<step>` (None for an empty spec)."""
    if not spec:
        return None
    point, _, step = spec.partition("@")
    if point not in FAULT_POINTS or not step.isdigit():
        raise ConfigError(f"{FAULT_ENV}={spec!r}: use <point>@<step> with a point among {', '.join(FAULT_POINTS)}")

    def fault(at: str, at_step: int) -> None:
        if (at, at_step) == (point, int(step)):
            print(f"neox: test fault {FAULT_ENV}={spec}: killing this rank now", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    return fault
