"""Start a `launch.py` run from a bench script and stop it once the bench has what it measures.

A bench stops its runs early (train.steps lies beyond the measured steps, so no final checkpoint is
written) with SIGINT: `launch.py` passes it to the workers, which exit at once. Three things could leave the
ranks training on, holding the GPU for the next measurement:
  * a process started in the background by a non-interactive shell (the GPU queue, `nohup ... &`) starts
    with SIGINT ignored, and an ignored signal stays ignored across exec: `launch.py` would never see it.
    `start` gives this process Python's SIGINT handler back (a handled signal is reset to its default across
    exec, so the run gets SIGINT's default and installs its own handler);
  * the workers run in a session of their own (the deepspeed runner's), so killing the launcher's
    process group does not reach them: `stop` ends every descendant it found while the run was alive;
  * the bench itself interrupted (Ctrl-C reaches only the bench: the run has its own session): `running`
    stops the run on the way out.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]


def start(cmd: Sequence[str], log: IO, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    """`cmd` in the repo, its output to `log`, in a session of its own, interruptible by SIGINT."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return subprocess.Popen(list(cmd), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


@contextlib.contextmanager
def running(cmd: Sequence[str], log: IO, env: Optional[Dict[str, str]] = None) -> Iterator[subprocess.Popen]:
    """`start`, and `stop` when the block ends, however it ends (an exception, the bench's own Ctrl-C)."""
    proc = start(cmd, log, env)
    try:
        yield proc
    finally:
        stop(proc)


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], timeout_s: float) -> bool:
    """Poll `ready` (the run's metrics) every second until it holds, the run ends or `timeout_s` passes;
    whether the run is still going (the bench then stops it)."""
    deadline = time.time() + timeout_s
    while proc.poll() is None and time.time() < deadline and not ready():
        time.sleep(1)
    return proc.poll() is None


def _start_time(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22); None if it is gone.
    With the pid it names one process: a pid the kernel gave to another process after this one exited has
    another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the name in parentheses may hold spaces
    return None if fields[0] == "Z" else int(fields[19])  # a zombie has exited: only its parent's wait is missing


def descendants(pid: int) -> List[Tuple[int, int]]:
    """Every live process below `pid` as (pid, start time), whatever its session; [] if there is none."""
    children: dict = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append((int(entry.name), int(fields[19])))
    found, todo = [], [pid]
    while todo:
        for child, started in children.get(todo.pop(), []):
            found.append((child, started))
            todo.append(child)
    return found


def alive(process: Tuple[int, int]) -> bool:
    """Whether (pid, start time) is still that process, running."""
    return _start_time(process[0]) == process[1]


def stop(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGINT to the run (launch.py stops its workers, no checkpoint); after `grace_s`, SIGKILL to it and to
    every process that was below it and is still that process, so no rank outlives the bench's measurement."""
    if proc.poll() is not None:
        return
    if proc.pid <= 1:
        raise ValueError(f"not a run's process: pid {proc.pid}")  # every process descends from 0 and 1
    tree = descendants(proc.pid)
    proc.send_signal(signal.SIGINT)
    deadline = time.time() + grace_s
    try:
        proc.wait(timeout=grace_s)
        while any(alive(p) for p in tree) and time.time() < deadline:  # the launcher is gone; its workers?
            time.sleep(0.5)
    except subprocess.TimeoutExpired:
        pass
    proc.kill()  # Popen's own: nothing once the launcher has been waited for (its pid may be another's now)
    for process in tree:
        if alive(process):
            try:
                os.kill(process[0], signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait()
