"""One live run per run directory: `<run_dir>/.lock`, taken by the launcher before it writes anything.

    with RunDirLock(run_dir) as lock:      # LaunchError (one line) when another live run owns it
        ...write the config, start the workers (pass lock.fd to them), wait...

The lock is an `fcntl.flock` on the open file; the file records who holds it (host, pid, start
time, and the Slurm job once one is submitted) for the messages. The kernel drops a flock when its
holder dies, so a lock left by a dead launcher is taken over (with one line); a clean release
removes the file. Workers started with the lock's fd inherited keep it held while they run, even
if the launcher itself is killed.

Slurm: the launcher calls `lock.hand_to_job(job_id)` right after submitting. From then on the file
names the job and stays after the launcher exits (with `cluster.wait=false`, at once): a later
launch asks `squeue` whether that job is still queued or running, and refuses while it is.
Inside a job started by hydra's submitit launcher every task of the job runs the launcher code:
the tasks of one job share the lock (the record names the job).

A holder on another host that did not hand the lock to a Slurm job cannot be checked from here (a
file system may not share flocks between hosts): the launch is refused, and the message says to
delete the file if that run is gone.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from neox.config.run_files import PENDING_CONFIG  # noqa: F401 - re-exported: the workers read it too
from neox.errors import LaunchError

LOCK_NAME = ".lock"
# Slurm states after which a job does not run again by itself (as in neox.launch.slurm).
_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
          "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}
_RECORD_WAIT_S = 5.0  # a holder writes its record right after taking the flock


def _say(msg: str) -> None:
    print(f"neox: {msg}", file=sys.stderr, flush=True)


def _own_job() -> Optional[str]:
    """The Slurm job this process is a task of, when hydra's submitit launcher runs the launcher in it
    (the test of neox.launch.slurm's in_submitit_slurm_job)."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        return os.environ.get("SLURM_JOB_ID")
    return None


def slurm_job_state(job_id: str) -> Optional[str]:
    """The job's state from squeue; "" when Slurm no longer knows it; None when squeue cannot be asked."""
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-t", "all", "-o", "%T"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.split() or [""])[0].upper() if out.returncode == 0 else ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(record: Dict[str, Any]) -> str:
    job = f", Slurm job {record['slurm_job']}" if record.get("slurm_job") else ""
    return f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, since {record.get('started', '?')}{job}"


class RunDirLock:
    def __init__(self, run_dir: Path, job_state: Callable[[str], Optional[str]] = slurm_job_state):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: Optional[int] = None  # open while this process holds the flock
        self.shared = False  # a co-owning task of the same Slurm job (holds no flock)
        self._created_dir = False
        self._job: Optional[str] = None
        self._job_state = job_state

    # ------------------------------------------------------------------------------------ take
    def acquire(self) -> "RunDirLock":
        self._make_dir()
        try:
            for _ in range(100):  # retried only when the holder removed the file as we opened it
                if self._try_once():
                    return self
        except BaseException:
            self._close()
            self._remove_dir_if_made()
            raise
        raise LaunchError(f"could not lock {self.path}: it keeps being replaced")

    def _make_dir(self) -> None:
        if os.path.isdir(self.run_dir):  # os.path: False, not OSError, for e.g. a name too long
            return
        if os.path.islink(self.run_dir):
            raise LaunchError(f"the run directory {self.run_dir} is a symbolic link to {os.readlink(self.run_dir)}, "
                              "which does not exist: create it, or set run_dir=<a writable path>")
        try:
            self.run_dir.mkdir(parents=True)
            self._created_dir = True
        except OSError as exc:
            raise LaunchError(f"cannot create the run directory {self.run_dir}: {exc.strerror or exc}; "
                              "set run_dir=<a writable path>") from None

    def _try_once(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LaunchError(f"cannot write in the run directory {self.run_dir} ({self.path}: "
                              f"{exc.strerror or exc}); set run_dir=<a writable path>") from None
        self.fd = fd
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return self._held_by_another()
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise LaunchError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
            locked = False  # a file system without flock: the record alone has to tell
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file between our open and our flock
            self._close()
            return False
        self._check_previous(self._read(), trust_flock=locked)
        self._write({"host": socket.gethostname(), "pid": os.getpid(),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S"), "slurm_job": _own_job()})
        return True

    def _held_by_another(self) -> bool:
        """Another live process holds the flock: refuse, unless it is a task of our own Slurm job."""
        deadline = time.time() + _RECORD_WAIT_S
        record = self._read()
        while not record and time.time() < deadline:
            time.sleep(0.1)
            record = self._read()
        own = _own_job()
        if own and record.get("slurm_job") == own:
            self._close()
            self.shared = True
            return True
        self._close()
        gone = ""
        if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int) \
                and not _alive(record["pid"]):
            gone = " (its launcher has exited, but processes it started still hold the lock: stop them first)"
        raise LaunchError(f"run dir {self.run_dir} is in use by another run ({describe(record)}){gone}: "
                          "wait for it to end or stop it, or choose another run_dir")

    def _check_previous(self, record: Dict[str, Any], trust_flock: bool) -> None:
        """We hold the flock, but the file has a record: its holder ended without releasing it."""
        if not record:
            return
        job = record.get("slurm_job")
        if job:
            if job == _own_job():
                return  # this job was requeued: its own earlier run
            state = self._job_state(str(job))
            if state is None:
                _say(f"the lock of {self.run_dir} names Slurm job {job}, and Slurm cannot be asked here; "
                     f"taking it over (make sure that job has ended: squeue -j {job})")
            elif state and state not in _ENDED:
                self._close()
                raise LaunchError(f"run dir {self.run_dir} belongs to Slurm job {job}, which is {state} "
                                  f"({describe(record)}): wait for it to end or `scancel {job}`, "
                                  "or choose another run_dir")
            return  # the job ended: its lock is released by ending
        host, pid = record.get("host"), record.get("pid")
        if host == socket.gethostname():
            if not trust_flock and isinstance(pid, int) and _alive(pid):
                self._close()
                raise LaunchError(f"run dir {self.run_dir} is in use by another run ({describe(record)}): "
                                  "wait for it to end or stop it, or choose another run_dir")
            _say(f"taking over the lock of {self.run_dir} from a run that is gone ({describe(record)})")
            return
        self._close()
        raise LaunchError(f"run dir {self.run_dir} is locked by a run on another machine ({describe(record)}), "
                          "and whether it is still running cannot be checked from here: if it is gone, "
                          f"delete {self.path} and rerun")

    # ------------------------------------------------------------------------------------ record
    def _read(self) -> Dict[str, Any]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(4096)
        except OSError:
            return {}
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return {"host": "?", "pid": "?", "started": "?"} if raw.strip() else {}
        return record if isinstance(record, dict) else {}

    def _write(self, record: Dict[str, Any]) -> None:
        assert self.fd is not None
        data = json.dumps({k: v for k, v in record.items() if v is not None}).encode() + b"\n"
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def hand_to_job(self, job_id: str) -> None:
        """The run now lives in Slurm job `job_id`: the lock stays with it after this process exits."""
        if self.fd is None:
            return
        self._job = str(job_id)
        record = self._read()
        record["slurm_job"] = self._job
        self._write(record)

    # ------------------------------------------------------------------------------------ release
    def release(self) -> None:
        if self.fd is not None and self._job is None:
            try:
                self.path.unlink()  # still holding the flock: nobody can have taken it meanwhile
            except OSError:
                pass
        self._close()
        self._remove_dir_if_made()

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _remove_dir_if_made(self) -> None:
        """A launch that created the run dir and was refused leaves nothing behind."""
        if self._created_dir:
            try:
                self.run_dir.rmdir()  # only when empty
            except OSError:
                pass
            self._created_dir = False

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
