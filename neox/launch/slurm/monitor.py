"""Waiting for submitted jobs: their state, rank 0's log streamed to the terminal, a job that can
never start cancelled with the reason and the field to change, and how each job ended.

    wait([run, ...]) -> 0, or the first failure's status
"""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from neox.config.schema import SlurmCluster
from neox.errors import EXIT_REQUEUE
from neox.launch.slurm.files import RECORD, never_started, remove_unstarted
from neox.launch.slurm.params import say

# Slurm job states after which the job will not run again (without a user's action).
TERMINAL = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT",
}
REQUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}


@dataclass
class SlurmRun:
    """A submitted job: its id, the run dir, where its logs go, and the cluster section it asked with."""

    job_id: str
    run_dir: Path
    tasks: int
    name: str
    cluster: SlurmCluster  # the section it asked with (for the field names and values messages give)

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "slurm"

    def log(self, rank: int = 0, kind: str = "out") -> Path:
        return self.log_dir / f"{self.job_id}_{rank}_log.{kind}"

    def save(self) -> None:
        record = {"job_id": self.job_id, "tasks": self.tasks, "name": self.name,
                  "cluster": dataclasses.asdict(self.cluster)}
        (self.log_dir / RECORD).write_text(json.dumps(record) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> "SlurmRun":
        """The job last submitted for this run dir."""
        record = json.loads((Path(run_dir) / "slurm" / RECORD).read_text())
        return cls(str(record["job_id"]), Path(run_dir), int(record["tasks"]), str(record["name"]),
                   SlurmCluster(**record["cluster"]))


# ---------------------------------------------------------------------------------------------
# What Slurm says about a job


@dataclass(frozen=True)
class JobInfo:
    state: Optional[str]  # None: Slurm does not know the job (any more)
    reason: str = ""
    started: str = ""  # start time of the job's current run
    partition: str = ""
    account: str = ""


def _run(cmd: List[str]) -> Tuple[int, str]:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return 1, ""
    return res.returncode, res.stdout


def job_infos(job_ids: List[str]) -> Dict[str, JobInfo]:
    """Every job's info from one squeue call (live and recent jobs), else from sacct (older ones)."""
    infos: Dict[str, JobInfo] = {}
    _, out = _run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%r|%S|%P|%a"])
    for line in out.splitlines():
        fields = (line.split("|") + [""] * 6)[:6]
        job_id, state, reason, started, partition, account = (f.strip() for f in fields)
        if job_id in job_ids:
            infos[job_id] = JobInfo(state.upper() or None, reason, started, partition, account)
    for job_id in job_ids:
        if job_id not in infos:
            _, out = _run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id])
            state = out.split()[0].upper() if out.split() else None
            infos[job_id] = JobInfo(state)
    return infos


# ---------------------------------------------------------------------------------------------
# A job that can never start


def _partition_unavailable(partition: str) -> bool:
    """Every node of the partition is drained, draining, down or failed."""
    if not partition:
        return False
    _, out = _run(["sinfo", "-h", "-p", partition, "-o", "%t"])
    states = [s.rstrip("*~#!%$@^-") for s in out.split()]
    return bool(states) and all(s in ("drain", "drng", "down", "fail", "failg", "maint") for s in states)


def _account_idle(account: str) -> bool:
    """No job of the account runs, so nothing will free an association's group limit."""
    if not account or account == "(null)":
        return True
    code, out = _run(["squeue", "-h", "-t", "RUNNING", "-A", account, "-o", "%i"])
    return code == 0 and not out.strip()


def hopeless(info: JobInfo) -> Optional[str]:
    """Why a pending job can never start as submitted (what to change), or None if it may still start."""
    r = info.reason
    part = f"partition {info.partition}" if info.partition else "the partition"
    if r == "PartitionTimeLimit":
        return (f"its time limit is above the MaxTime of {part}: lower cluster.time_min or pick another "
                "cluster.partition")
    if r == "PartitionNodeLimit":
        return f"it asks for more nodes than {part} allows: lower cluster.nodes or pick another cluster.partition"
    if r == "PartitionConfig":
        return (f"{part} cannot give what it asks for (CPUs, memory or GPUs per node, or its account or QOS): "
                "lower cluster.cpus_per_task, cluster.mem_gb or cluster.gpus_per_node, or pick another "
                f"cluster.partition (`scontrol show partition {info.partition}` has its limits)")
    if r in ("JobHeldUser", "JobHeldAdmin"):
        return ("it is held (a hold in cluster.sbatch_extra, or scontrol hold): `scontrol release` it within "
                "cluster.hopeless_pending_s, or submit it without the hold")
    if r == "BadConstraints":
        return f"no node of {part} has the features of cluster.constraint: change or drop cluster.constraint"
    if r in ("InvalidAccount", "InvalidQOS"):
        key = "account" if r == "InvalidAccount" else "qos"
        return f"the {key} it names is not valid for you or for {part}: set cluster.{key} to one you may use"
    if re.match(r"(QOS|Assoc)Max\w*PerJob", r):
        return (f"it is above a per-job limit of its QOS or association: ask for less ({_field_of(r)}), "
                "or use another cluster.qos")
    if r.startswith("AssocGrp") and _account_idle(info.account):
        return ("it is above a group limit of its association and none of the account's jobs runs to free it: "
                f"ask for less ({_field_of(r)}), or use another cluster.account")
    if (r.startswith("ReqNodeNotAvail") or r.startswith("Nodes required for job are DOWN")) \
            and _partition_unavailable(info.partition):
        return (f"every node of {part} is drained or down: pick another cluster.partition, or raise "
                "cluster.hopeless_pending_s to wait for them")
    return None


def reason_name(reason: str) -> str:
    """Slurm's short name for a pending reason (some versions show ReqNodeNotAvail as a sentence)."""
    return "ReqNodeNotAvail" if reason.startswith("Nodes required for job are DOWN") else reason


def _field_of(reason: str) -> str:
    for word, key in (("Wall", "time_min"), ("Node", "nodes"), ("Cpu", "cpus_per_task"), ("CPU", "cpus_per_task"),
                      ("GRES", "gpus_per_node"), ("Mem", "mem_gb")):
        if word in reason:
            return f"cluster.{key}"
    return "cluster.nodes, cluster.cpus_per_task, cluster.gpus_per_node or cluster.time_min"


# ---------------------------------------------------------------------------------------------
# Rank 0's log, streamed


# submitit's own bookkeeping lines in the task's stdout; not part of what a local run shows.
_NOISE = re.compile(r"^submitit (INFO|DEBUG) \(")


@dataclass
class LogTail:
    """New complete lines of a file that grows (the job appends to it, also after a requeue)."""

    path: Path
    prefix: str = ""
    offset: int = 0

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1
        if end:
            self.offset += end
            for line in data[:end].decode(errors="replace").splitlines():
                if not _NOISE.match(line):
                    print(f"{self.prefix}{line}", flush=True)


# ---------------------------------------------------------------------------------------------
# Waiting


@dataclass
class _Watch:
    """What the wait loop knows of one job."""

    run: SlurmRun
    tail: LogTail
    states: List[str] = field(default_factory=list)
    started: str = ""  # start time of the current run of the job
    requeue_said: bool = False
    hopeless_since: Optional[float] = None
    hopeless_said: bool = False


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _outcome(run: SlurmRun, state: Optional[str]) -> int:
    """Read the tasks' results once the job has ended; say what happened; return the exit status."""
    from submitit.core.utils import JobPaths, pickle_load

    if state != "COMPLETED" and never_started(run.log_dir, run.job_id):  # its tasks would have opened their logs first
        how = "was cancelled (scancel)" if state == "CANCELLED" else f"ended {state or 'unknown to Slurm'}"
        say(f"job {run.job_id} {how} before it started; nothing ran")
        remove_unstarted(run.run_dir, run.job_id)
        return 1
    paths = [JobPaths(run.log_dir, job_id=run.job_id, task_id=r) for r in range(run.tasks)]
    deadline = time.time() + (15 if state == "COMPLETED" else 3)  # shared filesystems lag
    while not all(p.result_pickle.exists() for p in paths) and time.time() < deadline:
        time.sleep(0.5)
    results: Dict[int, Any] = {}
    for rank, p in enumerate(paths):
        try:
            results[rank] = pickle_load(p.result_pickle)
        except Exception:  # missing or half-written: that rank did not finish
            pass
    # The rank that raised first is the cause; the others mostly fail in a collective after it.
    errors = sorted(
        ((paths[r].result_pickle.stat().st_mtime, r, res[1]) for r, res in results.items() if res[0] == "error"),
    )
    if errors:
        _, rank, trace = errors[0]
        also = f" (then rank(s) {', '.join(str(e[1]) for e in errors[1:])})" if errors[1:] else ""
        say(
            f"job {run.job_id} failed: training raised on rank {rank}{also}:\n{trace.rstrip()}\n"
            f"  logs: {run.log(rank, 'err')}  {run.log(rank, 'out')}"
        )
        return 1
    if 0 not in results:
        how = {
            "CANCELLED": "was cancelled (scancel)",
            "TIMEOUT": "hit its time limit without saving and requeuing",
            "OUT_OF_MEMORY": "ran out of memory",
            "NODE_FAIL": "lost a node",
            None: "is no longer known to Slurm",
        }.get(state, f"ended {state}")
        tail = _tail(run.log(0, "err"), 8)
        say(
            f"job {run.job_id} {how} before the trainer finished; the run dir {run.run_dir} keeps its "
            f"checkpoints (rerun the same command to resume). logs: {run.log(0, 'err')}"
            + (f"\n  last lines:\n{tail}" if tail else "")
        )
        return 1
    rcs = {r: int(res[1]) for r, res in results.items() if res[0] == "success"}
    rc = rcs[0] if rcs.get(0) else max(rcs.values(), default=0)
    if state == "CANCELLED":
        saved = " after saving a checkpoint at its last step" if rc == EXIT_REQUEUE else ""
        say(f"job {run.job_id} was cancelled (scancel){saved}; rerun the same command to resume from "
            f"{run.run_dir}. logs: {run.log(0, 'err')}")
        return 1
    if rc == 0:
        print(f"Slurm job {run.job_id} completed: {run.run_dir}", flush=True)
    elif rc == EXIT_REQUEUE:
        say(
            f"job {run.job_id} stopped for preemption/time limit after saving a checkpoint and was not "
            f"requeued (see {run.log(0, 'out')}); rerun the same command to resume from {run.run_dir}"
        )
    else:
        say(f"job {run.job_id} ended with status {rc}; logs: {run.log(0, 'err')}")
    return rc


def _cancel_hopeless(w: _Watch, info: JobInfo, why: str) -> int:
    run = w.run
    subprocess.run(["scancel", run.job_id], capture_output=True, timeout=60)
    grace = run.cluster.hopeless_pending_s
    print(f"neox: error: Slurm job {run.job_id} ({run.name}) can never start: it pended {grace} s with reason "
          f"{reason_name(info.reason)}: {why}. It was cancelled", file=sys.stderr, flush=True)
    if never_started(run.log_dir, run.job_id):
        remove_unstarted(run.run_dir, run.job_id)
    return 2


def _step(w: _Watch, info: JobInfo, now: float) -> Optional[int]:
    """Follow one job by one observation; its exit status once it has ended, else None."""
    run, state = w.run, info.state
    last = w.states[-1] if w.states else None
    why = hopeless(info) if state == "PENDING" else None
    if why is None:
        w.hopeless_since = None
    else:
        w.hopeless_since = w.hopeless_since or now
        grace = run.cluster.hopeless_pending_s
        if grace is not None and now - w.hopeless_since >= grace:
            return _cancel_hopeless(w, info, why)
        if grace is None and not w.hopeless_said and now - w.hopeless_since >= 60:
            w.hopeless_said = True
            say(f"job {run.job_id} may never start (reason {reason_name(info.reason)}): {why}; still waiting "
                f"(cluster.hopeless_pending_s=null)")
    # A requeue shows as RUNNING -> (COMPLETING) -> PENDING, or, between two polls, only as a new start time.
    if w.started and not w.requeue_said and (
        state in REQUEUED or (state == "RUNNING" and info.started != w.started)
    ):
        w.requeue_said = True
        print(f"Slurm job {run.job_id} was requeued; it resumes from the latest checkpoint", flush=True)
    if state == "RUNNING" and info.started != w.started:
        w.started, w.requeue_said = info.started, False
    if state != last:
        w.states.append(state or "UNKNOWN")
        if state == "RUNNING":
            print(f"Slurm job {run.job_id} is running", flush=True)
        if state in ("REQUEUE_HOLD", "SPECIAL_EXIT"):
            say(f"job {run.job_id} is held ({state}): `scontrol release {run.job_id}` to let it run")
    return None


def wait(runs: List[SlurmRun], poll_s: float = 15.0) -> int:
    """Wait for every job to end, streaming rank 0's log; say how each ended. Returns 0, or the
    first failure's status (2 for a job cancelled because it could never start)."""
    prefix = len(runs) > 1
    watches = {r.job_id: _Watch(r, LogTail(r.log(0), f"[{r.name}] " if prefix else "")) for r in runs}
    status: Dict[str, int] = {}
    start = next_poll = time.time()
    try:
        while len(status) < len(runs):
            now = time.time()
            if now >= next_poll:
                left = [j for j in watches if j not in status]
                for job_id, info in job_infos(left).items():
                    w = watches[job_id]
                    gone = info.state is None and (any(s != "UNKNOWN" for s in w.states) or now - start > 60)
                    if info.state in TERMINAL or gone:
                        w.tail.pump()
                        status[job_id] = _outcome(w.run, info.state)
                    else:
                        rc = _step(w, info, now)
                        if rc is not None:
                            status[job_id] = rc
                next_poll = now + min(poll_s, 1.0 + (now - start) / 20)
            for job_id, w in watches.items():
                if job_id not in status:
                    w.tail.pump()
            if len(status) < len(runs):
                time.sleep(max(0.0, min(1.0, next_poll - time.time())))
    except KeyboardInterrupt:
        left = [j for j in watches if j not in status]
        say(f"stopped waiting; still queued or running: {' '.join(left)} (scancel {' '.join(left)} to stop them)")
        return 130
    failed = [job_id for job_id, rc in status.items() if rc]
    if len(runs) > 1 and failed:
        say(f"{len(failed)} of {len(runs)} Slurm jobs did not succeed: {' '.join(failed)}")
    return next((status[r.job_id] for r in runs if status[r.job_id]), 0)
