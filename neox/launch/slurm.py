"""Run training as a Slurm job: one job of nodes × tasks_per_node ranks, submitted through submitit.

    submit(cfg, plan, config_path, run_dir) -> exit status

Each Slurm task (one per rank) takes its rank from Slurm (`submitit.JobEnvironment`), sets RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (the job's first node) and MASTER_PORT
(derived from the job id, so every rank and every requeue agrees), and calls
`neox.train.worker.run(config_path)`. Logs go to `<run_dir>/slurm/<jobid>_<rank>_log.{out,err}`.

Preemption and time limits (see neox.train.preempt): the job is submitted with
`--signal=USR2@signal_delay_s` and `--requeue`. The trainer's PreemptionWatcher turns USR2/SIGTERM
into a flag the ranks agree on at a step boundary; the trainer saves and returns EXIT_REQUEUE, and
rank 0 here runs `scontrol requeue` (at most `max_requeue` times, counted by SLURM_RESTART_COUNT).
The requeued job reruns the same submission and the trainer resumes from the run dir's latest
checkpoint, which is also what happens after an outside `scontrol requeue` or a Slurm preemption
with PreemptMode=REQUEUE. The submitted callable is a submitit Checkpointable, so a USR2 that
arrives before the trainer has installed its watcher still requeues (through submitit).

Sweeps: under a Hydra multirun with the basic launcher, `submit` does not block: it submits and
records the job, and the entry point calls `wait_pending()` once the sweep is submitted, so the
jobs run in parallel. With `hydra/launcher=submitit_slurm` Hydra itself submits each run as a
Slurm job; `submit` then sees it is already inside a submitit Slurm job and runs the worker in
place (one Slurm task per rank: set the launcher's tasks_per_node/nodes/gpus_per_node to match).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from neox.errors import LaunchError

ENTRY = "neox.train.worker:run"
# Slurm job states after which the job will not run again (without a user's action).
TERMINAL = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT",
}
REQUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}
# Pending reasons that mean the job does not fit what the partition or nodes offer.
NEVER_RUNS = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "ReqNodeNotAvail",
              "AssocMaxJobsLimit", "InvalidAccount", "InvalidQOS", "QOSMaxWallDurationPerJobLimit"}
# Below this much time between start and the time-limit signal, a job may never save a step.
MIN_USEFUL_S = 600
_REQUEUE_WAIT_S = 600  # how long rank 0 waits to be killed by its own `scontrol requeue`


def _say(msg: str) -> None:
    print(f"[neox slurm] {msg}", file=sys.stderr, flush=True)


def _get(cfg: Any, path: str, default: Any = None) -> Any:
    node = cfg
    for key in path.split("."):
        if node is None:
            return default
        node = node.get(key, None) if hasattr(node, "get") else getattr(node, key, None)
    return default if node is None else node


# ---------------------------------------------------------------------------------------------
# Checks and sbatch parameters (no Slurm needed)


def tasks_per_node(cluster: Any) -> int:
    """Ranks per node: tasks_per_node, else one per GPU, else 1 (CPU)."""
    if cluster.tasks_per_node:
        return int(cluster.tasks_per_node)
    return int(cluster.gpus_per_node) or 1


def check(cfg: Any, plan: Any) -> int:
    """Validate the layout against the allocation; return tasks per node. Warns about short limits."""
    cl = cfg.cluster
    tpn = tasks_per_node(cl)
    nodes, gpn = int(cl.nodes), int(cl.gpus_per_node)
    world = int(plan.world_size)
    tp, pp, dp = int(plan.tp), int(plan.pp), int(plan.dp)
    layout = f"tp={tp} × pp={pp} × dp={dp} = {world} ranks"
    if nodes < 1 or tpn < 1:
        raise LaunchError(f"cluster.nodes={nodes} and tasks per node={tpn} must both be at least 1")
    if gpn > 0:
        if world > nodes * gpn:
            need = -(-world // gpn)
            raise LaunchError(
                f"the layout {layout} needs {world} GPUs but cluster.nodes={nodes} × "
                f"cluster.gpus_per_node={gpn} gives {nodes * gpn}: set cluster.nodes={need} or shrink the layout"
            )
        if tpn > gpn:
            raise LaunchError(
                f"cluster.tasks_per_node={tpn} is more than cluster.gpus_per_node={gpn}: each rank needs its own GPU"
            )
    if world != nodes * tpn:
        raise LaunchError(
            f"the layout {layout} does not match the job's cluster.nodes={nodes} × {tpn} tasks per node "
            f"= {nodes * tpn} ranks: set cluster.nodes (or cluster.tasks_per_node) so they are equal"
        )
    if nodes > 1 and (tp > tpn or tpn % tp) and not _get(cfg, "parallelism.tp_across_nodes_is_slow", False):
        raise LaunchError(
            f"tp={tp} does not fit within a node's {tpn} ranks, so tensor-parallel groups would span nodes "
            "(slow): lower tp, or set parallelism.tp_across_nodes_is_slow=true to do it anyway"
        )
    limit_s = int(cl.time_min) * 60
    usable_s = limit_s - int(cl.signal_delay_s)
    if usable_s <= 0:
        raise LaunchError(
            f"cluster.signal_delay_s={cl.signal_delay_s} is not below the time limit of {cl.time_min} min: "
            "the stop signal would come at the start; raise cluster.time_min"
        )
    first_save = min(int(_get(cfg, "train.save_every", 0) or 0) or 10**9, int(_get(cfg, "train.steps", 0) or 10**9))
    step_s = getattr(plan, "step_time_s", None)  # the plan's estimate, when it has one
    need_s = MIN_USEFUL_S + (first_save * float(step_s) if step_s else 0.0)
    if usable_s < need_s:
        _say(
            f"warning: cluster.time_min={cl.time_min} leaves {usable_s} s before the stop signal "
            f"(signal_delay_s={cl.signal_delay_s}); startup plus the steps to the first checkpoint "
            f"(step {first_save}) may take longer, and a job that never saves restarts from scratch on "
            "every requeue: raise cluster.time_min"
        )
    return tpn


def executor_parameters(cfg: Any, tpn: int, job_name: str) -> Dict[str, Any]:
    """The submitit SlurmExecutor parameters (sbatch flags) for this run."""
    cl = cfg.cluster
    cpu = int(cl.gpus_per_node) == 0
    setup = ["export OMP_NUM_THREADS=1" if cpu else "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}"]
    setup += [str(line) for line in (cl.setup or [])]
    extra = {"requeue": True}
    extra.update({str(k): v for k, v in dict(cl.sbatch_extra or {}).items()})
    params: Dict[str, Any] = dict(
        job_name=job_name,
        nodes=int(cl.nodes),
        ntasks_per_node=tpn,
        cpus_per_task=int(cl.cpus_per_task),
        time=int(cl.time_min),
        signal_delay_s=int(cl.signal_delay_s),
        setup=setup,
        additional_parameters=extra,
        # One failing rank ends the step at once, instead of the others waiting in a collective.
        srun_args=["--kill-on-bad-exit=1"],
    )
    if not cpu:
        params["gpus_per_node"] = int(cl.gpus_per_node)
    optional = {
        "partition": cl.partition, "account": cl.account, "qos": cl.qos,
        "constraint": cl.constraint, "exclude": cl.exclude,
    }
    params.update({k: str(v) for k, v in optional.items() if v})
    if cl.mem_gb:
        params["mem"] = f"{int(cl.mem_gb)}GB"
    return params


# ---------------------------------------------------------------------------------------------
# Inside the job: one call per Slurm task (rank)


def in_submitit_slurm_job() -> bool:
    """True inside a task started by submitit on Slurm (ours, or hydra/launcher=submitit_slurm)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_JOB_ID" in os.environ


def _load_entry(entry: str) -> Callable[[str], int]:
    """'package.module:function', or '/path/to/file.py:function'."""
    module_name, _, func = entry.rpartition(":")
    if module_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        if spec is None or spec.loader is None:
            raise LaunchError(f"cannot load the worker entry {entry}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return getattr(module, func)


def master_port(job_id: str, restart: int) -> int:
    """A port every rank derives alike; it moves with each requeue (the old one may linger)."""
    digits = "".join(ch for ch in job_id if ch.isdigit()) or "0"
    return 20000 + (int(digits) * 7 + restart * 1009) % 12000  # below Linux's ephemeral range


def _job_info(job_id: str) -> Tuple[Optional[str], str, str]:
    """(state, pending reason, start time) from squeue (live jobs), else sacct (finished ones)."""
    for cmd in (
        ["squeue", "-h", "-j", job_id, "-t", "all", "-o", "%T|%r|%S"],
        ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id],
    ):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if out:
            state, reason, start = (out.splitlines()[0].split("|") + ["", ""])[:3]
            return state.split()[0].upper(), reason.strip(), start.strip()
    return None, "", ""


def _job_state(job_id: str) -> Optional[str]:
    return _job_info(job_id)[0]


def _requeue_self(job_id: str, max_requeue: int) -> bool:
    """Rank 0, after the trainer saved and returned EXIT_REQUEUE: requeue this job. True if done."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if restarts >= max_requeue:
        _say(f"not requeuing job {job_id}: it was requeued {restarts} times already (cluster.max_requeue={max_requeue})")
        return False
    state = _job_state(job_id)
    if state != "RUNNING":  # cancelled, or Slurm is requeuing it already (preemption, scontrol requeue)
        _say(f"not requeuing job {job_id}: it is {state} (cancelled, or requeued by Slurm already)")
        return False
    res = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if res.returncode:
        _say(f"scontrol requeue {job_id} failed: {(res.stderr or res.stdout).strip()}")
        return False
    _say(f"requeued job {job_id} (requeue {restarts + 1} of at most {max_requeue}); it resumes from the latest checkpoint")
    return True


def run_task(config_path: str, entry: str = ENTRY, max_requeue: int = 3) -> int:
    """Run one rank of the trainer inside a Slurm task. Returns the trainer's exit status."""
    import submitit

    from neox.train.preempt import EXIT_REQUEUE

    env = submitit.JobEnvironment()
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    addr = env.hostnames[0]
    port = master_port(env.raw_job_id, restart)
    os.environ.update(
        RANK=str(env.global_rank),
        WORLD_SIZE=str(env.num_tasks),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.num_tasks // max(env.num_nodes, 1)),
        MASTER_ADDR=addr,
        MASTER_PORT=str(port),
    )
    if env.global_rank == 0:
        _say(f"job {env.job_id}: {env.num_tasks} ranks on {env.num_nodes} node(s), master {addr}:{port}, restart {restart}")
    rc = int(_load_entry(entry)(str(config_path)))
    if rc != EXIT_REQUEUE:
        return rc
    # Stopped for preemption after saving. From here on a SIGTERM (our own requeue) just ends us.
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    if env.global_rank != 0:
        return rc
    if _requeue_self(env.job_id, max_requeue):
        time.sleep(_REQUEUE_WAIT_S)  # Slurm kills this task as it requeues the job
        _say(f"job {env.job_id} was not killed {_REQUEUE_WAIT_S} s after its requeue")
    return rc


@dataclass
class SlurmTask:
    """What submitit pickles and runs on every rank; resubmits itself unchanged on USR2."""

    config_path: str
    entry: str = ENTRY
    max_requeue: int = 3

    def __call__(self) -> int:
        return run_task(self.config_path, self.entry, self.max_requeue)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        # Only reached when USR2 comes before the trainer's PreemptionWatcher took over the signal
        # (or on rank 0 under hydra's launcher); the trainer resumes from its own checkpoints.
        import submitit

        return submitit.helpers.DelayedSubmission(self)


# ---------------------------------------------------------------------------------------------
# On the submitting side


@dataclass
class SlurmRun:
    """A submitted job: the submitit job, where it runs and logs."""

    job: Any
    run_dir: Path
    log_dir: Path
    tasks: int
    states: List[str] = field(default_factory=list)
    reason: str = ""
    started: str = ""  # start time of the current run of the job
    requeue_said: bool = False

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)

    def log(self, rank: int = 0, kind: str = "out") -> Path:
        return self.log_dir / f"{self.job_id}_{rank}_log.{kind}"


_PENDING: List[SlurmRun] = []


def _is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # no Hydra, or not under hydra.main
        return False


def submit_job(cfg: Any, plan: Any, config_path: Path, run_dir: Path, entry: str = ENTRY) -> SlurmRun:
    """Check, then submit the job without waiting. Raises LaunchError on any refusal."""
    if shutil.which("sbatch") is None:
        raise LaunchError(
            "sbatch not found: this machine is not a Slurm submit host (or Slurm is not on PATH); "
            "submit from a Slurm login node, or train on this machine with cluster=local"
        )
    tpn = check(cfg, plan)
    import submitit

    run_dir = Path(run_dir).resolve()
    log_dir = run_dir / "slurm"
    log_dir.mkdir(parents=True, exist_ok=True)
    cl = cfg.cluster
    job_name = str(_get(cfg, "run_name", None) or run_dir.name)
    executor = submitit.SlurmExecutor(folder=log_dir, max_num_timeout=int(cl.max_requeue))
    executor.update_parameters(**executor_parameters(cfg, tpn, job_name))
    task = SlurmTask(str(Path(config_path).resolve()), entry, int(cl.max_requeue))
    try:
        job = executor.submit(task)
    except Exception as exc:  # submitit wraps sbatch's stderr in its own error
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        said = [ln for ln in lines if "sbatch" in ln.lower() or "error" in ln.lower()] or lines[-3:]
        raise LaunchError(f"sbatch refused the job: {' | '.join(said)}") from exc
    run = SlurmRun(job=job, run_dir=run_dir, log_dir=log_dir, tasks=int(cl.nodes) * tpn)
    print(f"Submitted Slurm job {run.job_id}: {cl.nodes} node(s) × {tpn} tasks, run dir {run_dir}", flush=True)
    print(f"  logs: {run.log(0)}  {run.log(0, 'err')}  (rank r: {log_dir}/{run.job_id}_<r>_log.*)", flush=True)
    return run


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _outcome(run: SlurmRun, state: Optional[str]) -> int:
    """Read the tasks' results once the job has ended; say what happened; return the exit status."""
    from submitit.core.utils import JobPaths, pickle_load

    from neox.train.preempt import EXIT_REQUEUE

    paths = [JobPaths(run.log_dir, job_id=run.job_id, task_id=r) for r in range(run.tasks)]
    deadline = time.time() + (15 if state == "COMPLETED" else 3)  # shared filesystems lag
    while not all(p.result_pickle.exists() for p in paths) and time.time() < deadline:
        time.sleep(0.5)
    results: Dict[int, Any] = {}
    for rank, p in enumerate(paths):
        try:
            results[rank] = pickle_load(p.result_pickle)
        except Exception:
            pass
    # The rank that raised first is the cause; the others mostly fail in a collective after it.
    errors = sorted(
        ((paths[r].result_pickle.stat().st_mtime, r, res[1]) for r, res in results.items() if res[0] == "error"),
    )
    if errors:
        _, rank, trace = errors[0]
        also = f" (then rank(s) {', '.join(str(e[1]) for e in errors[1:])})" if errors[1:] else ""
        _say(
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
        _say(
            f"job {run.job_id} {how} before the trainer finished; the run dir {run.run_dir} keeps its "
            f"checkpoints (rerun the same command to resume). logs: {run.log(0, 'err')}"
            + (f"\n  last lines:\n{tail}" if tail else "")
        )
        return 1
    rcs = {r: int(res[1]) for r, res in results.items() if res[0] == "success"}
    rc = rcs[0] if rcs.get(0) else max(rcs.values(), default=0)
    if state == "CANCELLED":
        saved = " after saving a checkpoint at its last step" if rc == EXIT_REQUEUE else ""
        _say(f"job {run.job_id} was cancelled (scancel){saved}; rerun the same command to resume from "
             f"{run.run_dir}. logs: {run.log(0, 'err')}")
        return 1
    if rc == 0:
        print(f"Slurm job {run.job_id} completed: {run.run_dir}", flush=True)
    elif rc == EXIT_REQUEUE:
        _say(
            f"job {run.job_id} stopped for preemption/time limit after saving a checkpoint and was not "
            f"requeued (see {run.log(0, 'err')}); rerun the same command to resume from {run.run_dir}"
        )
    else:
        _say(f"job {run.job_id} ended with status {rc}; logs: {run.log(0, 'err')}")
    return rc


def wait(runs: List[SlurmRun], poll_s: float = 15.0) -> int:
    """Wait for every job to end; say how each ended. Returns 0, or the first failure's status."""
    status: Dict[str, int] = {}
    start = time.time()
    try:
        while len(status) < len(runs):
            for run in runs:
                if run.job_id in status:
                    continue
                state, reason, started = _job_info(run.job_id)
                last = run.states[-1] if run.states else None
                if state == "PENDING" and reason in NEVER_RUNS and reason != run.reason:
                    _say(f"job {run.job_id} is pending with reason {reason}: as submitted it may never start "
                         f"(`scontrol show job {run.job_id}`); scancel it and fix the cluster.* resources")
                run.reason = reason
                # A requeue shows as RUNNING -> (COMPLETING) -> PENDING, or, between two polls, only
                # as a new start time.
                if run.started and not run.requeue_said and (
                    state in REQUEUED or (state == "RUNNING" and started != run.started)
                ):
                    run.requeue_said = True
                    print(f"Slurm job {run.job_id} was requeued; it resumes from the latest checkpoint", flush=True)
                if state == "RUNNING" and started != run.started:
                    run.started, run.requeue_said = started, False
                if state != last:
                    run.states.append(state or "UNKNOWN")
                    if state == "RUNNING":
                        print(f"Slurm job {run.job_id} is running", flush=True)
                    if state in ("REQUEUE_HOLD", "SPECIAL_EXIT"):
                        _say(f"job {run.job_id} is held ({state}): `scontrol release {run.job_id}` to let it run")
                gone = state is None and (any(s != "UNKNOWN" for s in run.states) or time.time() - start > 60)
                if state in TERMINAL or gone:
                    status[run.job_id] = _outcome(run, state)
            if len(status) < len(runs):
                time.sleep(min(poll_s, 1.0 + (time.time() - start) / 20))
    except KeyboardInterrupt:
        left = [r.job_id for r in runs if r.job_id not in status]
        _say(f"stopped waiting; still queued or running: {' '.join(left)} (scancel {' '.join(left)} to stop them)")
        return 130
    failed = [job_id for job_id, rc in status.items() if rc]
    if len(runs) > 1 and failed:
        _say(f"{len(failed)} of {len(runs)} Slurm jobs did not succeed: {' '.join(failed)}")
    return next((rc for rc in status.values() if rc), 0)


def wait_pending() -> int:
    """Wait for the jobs a multirun submitted without waiting; 0 when none or all succeeded."""
    runs = list(_PENDING)
    _PENDING.clear()
    if not runs:
        return 0
    print(f"Waiting for {len(runs)} Slurm jobs: {' '.join(r.job_id for r in runs)}", flush=True)
    return wait(runs)


def submit(
    cfg: Any,
    plan: Any,
    config_path: Path,
    run_dir: Path,
    *,
    wait_for_end: Optional[bool] = None,
    entry: str = ENTRY,
) -> int:
    """Submit the run as one Slurm job; the exit status (0: succeeded, or submitted with wait=false).

    Under a Hydra multirun it never blocks: the job is recorded, and `wait_pending()` (called by
    the entry point after the sweep) waits for all of them, honouring cluster.wait. Inside a
    job started by hydra/launcher=submitit_slurm it runs this rank of the worker in place.
    """
    if in_submitit_slurm_job():
        ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
        if int(plan.world_size) != ntasks:
            raise LaunchError(
                f"this Slurm job has {ntasks} tasks but the layout needs {plan.world_size} ranks: set the "
                "launcher's hydra.launcher.tasks_per_node and nodes so they multiply to the world size"
            )
        return run_task(str(Path(config_path).resolve()), entry, int(cfg.cluster.max_requeue))
    run = submit_job(cfg, plan, config_path, run_dir, entry)
    blocking = bool(cfg.cluster.wait) if wait_for_end is None else wait_for_end
    if _is_multirun():
        if blocking:
            _PENDING.append(run)
        return 0
    return wait([run]) if blocking else 0
