"""Processes the tests start: free ports, DeepSpeed's /dev/shm files, killing a process tree."""
from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
import socket
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Set

SHM_GLOB = "/dev/shm/deepspeed*"


def free_port() -> int:
    """A TCP port nobody listens on now (the deepspeed launcher's default 29500 is shared)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shm_files() -> Set[str]:
    """DeepSpeed's CPU all-reduce buffers: each rank started by the deepspeed launcher leaves one."""
    return set(glob.glob(SHM_GLOB))


def master_ports(text: str) -> Set[int]:
    """The master ports in a launcher's output (`launching N workers: ... --master_port P ...`)."""
    return {int(p) for p in re.findall(r"--master_port[= ](\d+)", text)}


def shm_port(path: str) -> Optional[int]:
    """The master port in a DeepSpeed buffer's name (deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>)."""
    parts = os.path.basename(path).rsplit("_", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


@contextlib.contextmanager
def no_shm_leak(what: str = "the run", ports: Optional[Callable[[], Iterable[int]]] = None) -> Iterator[None]:
    """Fail if the body leaves new /dev/shm/deepspeed* files; remove them first (66 MB each), so a
    failing test does not fill /dev/shm for the ones after it. `ports`, called at the end: the master
    ports of the body's runs; only their files count (the files are named by port), so another test
    running at the same time (pytest-xdist's other worker) is never blamed for, or robbed of, its own."""
    before = shm_files()
    try:
        yield
    finally:
        leaked = shm_files() - before
        if ports is not None:
            mine = set(ports())
            leaked = {path for path in leaked if shm_port(path) in mine}
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
