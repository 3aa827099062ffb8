"""Run training as a Slurm job: one job of nodes × tasks_per_node ranks, submitted through submitit.

    submit(plan, config_path, run_dir) -> exit status

By concern:
  params   what the job asks for: layout and time checks, the job name, the sbatch flags
  limits   the request against the partition's limits (MaxTime, nodes, CPUs, GPUs), before submitting
  task     inside the job: each task's bootstrap (rank, master address and port, requeue) and its exit status
  submission  check, submit, and (cluster.wait) wait; a refused submission leaves nothing behind
  monitor  waiting: job states, rank 0's log streamed, a job that can never start cancelled, the outcome
  files    what a submission and its tasks write in <run_dir>/slurm; undoing a submission that never ran

Logs go to `<run_dir>/slurm/<jobid>_<rank>_log.{out,err}`; `<run_dir>/slurm/job.json` records the
job last submitted for the run dir (a sweep waits on its jobs through it, `wait_for`).

Preemption and time limits (see neox.train.preempt): the job is submitted with
`--signal=USR2@signal_delay_s` and `--requeue`. The trainer's PreemptionWatcher turns USR2/SIGTERM
into a flag the ranks agree on at a step boundary; the trainer saves and returns EXIT_REQUEUE, and
rank 0 runs `scontrol requeue` (at most `max_requeue` times, counted by SLURM_RESTART_COUNT). The
requeued job reruns the same submission and the trainer resumes from the run dir's latest
checkpoint, which is also what happens after an outside `scontrol requeue` or a Slurm preemption
with PreemptMode=REQUEUE. The submitted callable is a submitit Checkpointable, so a USR2 that
arrives before the trainer has installed its watcher still requeues (through submitit).

Sweeps: the entry point submits each run of a multirun with cluster.wait=false, then waits for all
of them (`wait_for`), so they run in parallel. With `hydra/launcher=submitit_slurm` Hydra itself
submits each run as a Slurm job; `submit` then sees it is already inside a submitit Slurm job and
runs the worker in place (one Slurm task per rank: set the launcher's shape to match).
"""
from __future__ import annotations

from pathlib import Path
from typing import List

from neox.launch.slurm.monitor import SlurmRun, wait
from neox.launch.slurm.params import check, executor_parameters, tasks_per_node
from neox.launch.slurm.submission import submit, submit_job
from neox.launch.slurm.task import SlurmTask, in_submitit_slurm_job, master_port, run_task

__all__ = [
    "SlurmRun", "SlurmTask", "check", "executor_parameters", "in_submitit_slurm_job", "master_port",
    "run_task", "submit", "submit_job", "tasks_per_node", "wait", "wait_for",
]


def wait_for(run_dirs: List[Path]) -> int:
    """Wait for the jobs last submitted for these run dirs (a sweep's); 0 when all succeeded."""
    if not run_dirs:
        return 0
    runs = [SlurmRun.load(d) for d in run_dirs]
    print(f"Waiting for {len(runs)} Slurm jobs: {' '.join(r.job_id for r in runs)}", flush=True)
    return wait(runs)
