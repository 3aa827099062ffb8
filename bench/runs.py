"""Start a `launch.py` run from a bench script and stop it once the bench has what it measures.

A bench stops its runs early (train.steps lies beyond the measured steps, so no final checkpoint is
written) with SIGINT: `launch.py` passes it to the workers, which exit at once. Two things could leave the
ranks training on, holding the GPU for the next measurement:
  * a process started in the background by a non-interactive shell (the GPU queue, `nohup ... &`) starts
    with SIGINT ignored, and an ignored signal stays ignored across exec: `launch.py` would never see it.
    `start` gives the run the default SIGINT disposition back;
  * the workers run in a session of their own (the deepspeed runner's), so killing the launcher's
    process group does not reach them. `stop` ends every descendant it found while the run was alive.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Python then installs its KeyboardInterrupt handler


def start(cmd: Sequence[str], log: IO, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    """`cmd` in the repo, its output to `log`, in a session of its own, interruptible by SIGINT."""
    return subprocess.Popen(list(cmd), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_interruptible)


def descendants(pid: int) -> List[int]:
    """Every live process below `pid` (from /proc; [] where there is none), whatever its session."""
    children: dict = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # the name in parentheses may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGINT to the run (launch.py stops its workers, no checkpoint); after `grace_s`, SIGKILL to it and to
    every process that was below it, so no rank outlives the bench's measurement."""
    if proc.poll() is not None:
        return
    if proc.pid <= 1:
        raise ValueError(f"not a run's process: pid {proc.pid}")  # every process descends from 0 and 1
    tree = descendants(proc.pid)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
        deadline = time.time() + grace_s  # the launcher is gone; give its workers the rest of the grace
        while any(_alive(p) for p in tree) and time.time() < deadline:
            time.sleep(0.5)
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid, *tree]:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"  # a zombie has exited: only its parent's wait is missing
