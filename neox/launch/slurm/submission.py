"""On the submitting side: check the request, submit the job through submitit, wait for it.

A refused submission (a layout or partition check, or sbatch itself) leaves nothing behind: the
files it created are removed, and so is the run dir when it held nothing but the config written
for this job.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

from neox.config.plan import RunPlan
from neox.errors import LaunchError
from neox.launch.slurm.limits import check_partition, find_partition
from neox.launch.slurm.files import remove_unstarted
from neox.launch.slurm.monitor import SlurmRun, wait
from neox.launch.slurm.params import check, executor_parameters, run_name
from neox.launch.slurm.task import ENTRY, SlurmTask, TaskExecutor, in_submitit_slurm_job, run_task


def submit_job(plan: RunPlan, config_path: Path, run_dir: Path, entry: str = ENTRY,
               lock: Optional[Any] = None) -> SlurmRun:
    """Check, then submit the job without waiting; the run dir's lock (neox.launch.rundir), when
    given, is handed to the job. Raises LaunchError on any refusal."""
    run_dir = Path(run_dir).resolve()
    log_dir = run_dir / "slurm"
    before = {p.name for p in log_dir.iterdir()} if log_dir.is_dir() else set()
    try:
        return _submit(plan, config_path, run_dir, entry, lock)
    except LaunchError:
        remove_unstarted(run_dir, before=before)
        raise


def _submit(plan: RunPlan, config_path: Path, run_dir: Path, entry: str, lock: Optional[Any]) -> SlurmRun:
    if shutil.which("sbatch") is None:
        raise LaunchError(
            "sbatch not found: this machine is not a Slurm submit host (or Slurm is not on PATH); "
            "submit from a Slurm login node, or train on this machine with cluster=local"
        )
    cl = plan.config.cluster
    tpn = check(plan)
    check_partition(cl, tpn, find_partition(cl.partition))
    log_dir = run_dir / "slurm"
    log_dir.mkdir(parents=True, exist_ok=True)
    name = run_name(plan, run_dir)
    executor = TaskExecutor(folder=log_dir, max_num_timeout=int(cl.max_requeue))
    executor.update_parameters(**executor_parameters(cl, tpn, name))
    task = SlurmTask(str(Path(config_path).resolve()), entry, int(cl.max_requeue))
    try:
        job = executor.submit(task)
    except Exception as exc:  # submitit wraps sbatch's stderr in its own error
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        said = [ln for ln in lines if "sbatch" in ln.lower() or "error" in ln.lower()] or lines[-3:]
        raise LaunchError(f"sbatch refused the job: {' | '.join(said)}") from None
    if lock is not None:
        lock.hand_to_job(str(job.job_id))
    run = SlurmRun(str(job.job_id), run_dir, int(cl.nodes) * tpn, name, cl)
    run.save()
    print(f"Submitted Slurm job {run.job_id} ({name}): {cl.nodes} node(s) × {tpn} tasks, run dir {run_dir}",
          flush=True)
    print(f"  logs: {run.log(0)}  {run.log(0, 'err')}  (rank r: {log_dir}/{run.job_id}_<r>_log.*)", flush=True)
    return run


def submit(
    plan: RunPlan,
    config_path: Path,
    run_dir: Path,
    *,
    wait_for_end: Optional[bool] = None,
    entry: str = ENTRY,
    lock: Optional[Any] = None,
) -> int:
    """Submit the run as one Slurm job and, unless cluster.wait=false, wait for it (holding `lock`,
    the run dir's, meanwhile); the exit status (0: it succeeded, or it was submitted without
    waiting). Inside a job started by hydra/launcher=submitit_slurm it runs this rank of the worker
    in place instead."""
    if in_submitit_slurm_job():
        ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
        if int(plan.world_size) != ntasks:
            raise LaunchError(
                f"this Slurm job has {ntasks} tasks but the layout needs {plan.world_size} ranks: set the "
                "launcher's hydra.launcher.tasks_per_node and nodes so they multiply to the world size"
            )
        return run_task(str(Path(config_path).resolve()), entry, int(plan.config.cluster.max_requeue))
    run = submit_job(plan, config_path, run_dir, entry, lock)
    blocking = bool(plan.config.cluster.wait) if wait_for_end is None else wait_for_end
    return wait([run]) if blocking else 0
