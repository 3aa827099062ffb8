"""Processes the tests start: free ports, DeepSpeed's /dev/shm files, killing a process tree."""
from __future__ import annotations

import contextlib
import glob
import os
import signal
import socket
from typing import Dict, Iterator, List, Set

SHM_GLOB = "/dev/shm/deepspeed*"


def free_port() -> int:
    """A TCP port nobody listens on now (the deepspeed launcher's default 29500 is shared)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shm_files() -> Set[str]:
    """DeepSpeed's CPU all-reduce buffers: each rank started by the deepspeed launcher leaves one."""
    return set(glob.glob(SHM_GLOB))


@contextlib.contextmanager
def no_shm_leak(what: str = "the run") -> Iterator[None]:
    """Fail if the body leaves new /dev/shm/deepspeed* files; remove them first (66 MB each), so a
    failing test does not fill /dev/shm for the ones after it."""
    before = shm_files()
    try:
        yield
    finally:
        leaked = shm_files() - before
        for path in leaked:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    assert not leaked, f"{what} left DeepSpeed buffers in /dev/shm: {sorted(leaked)}"


def descendants(pid: int) -> List[int]:
    """Every process below `pid` (a /proc walk; children first found, grandchildren after)."""
    children: Dict[int, List[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> List[str]:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().split("\0")[:-1]
    except OSError:
        return []


def kill_tree(pid: int) -> None:
    """SIGKILL a process this test started and every process below it (launcher, deepspeed, ranks)."""
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
