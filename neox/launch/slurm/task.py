"""Inside the job: the bootstrap every Slurm task (one per rank) runs.

The job script runs `python -m neox.launch.slurm <folder>` (see `TaskExecutor`): submitit's own
runner, which loads the pickled `SlurmTask` and calls it, followed by an exit with the trainer's
status, so Slurm's record (sacct's State and ExitCode) agrees with what the launcher says. Only
rank 0 exits with EXIT_REQUEUE: it decides whether the job requeues, and with srun's
--kill-on-bad-exit another rank's non-zero exit would kill it while it does.

`run_task` takes the rank from Slurm (`submitit.JobEnvironment`), sets RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (the job's first node) and MASTER_PORT (derived from the
job id, so every rank and every requeue agrees), and calls the trainer's entry. When the trainer
stopped for preemption after saving (EXIT_REQUEUE), rank 0 requeues the job (`scontrol requeue`,
at most `max_requeue` times, counted by SLURM_RESTART_COUNT) or says why it does not.
"""
from __future__ import annotations

import importlib
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import submitit

from neox.errors import EXIT_REQUEUE

ENTRY = "neox.train.worker:run"  # what each task runs, by name: launch does not import train
_REQUEUE_WAIT_S = 600  # how long rank 0 waits to be killed by its own `scontrol requeue`


def say(msg: str) -> None:
    """To the task's stdout: rank 0's <jobid>_0_log.out, which the launcher streams while it waits."""
    print(f"[neox slurm] {msg}", flush=True)


def in_submitit_slurm_job() -> bool:
    """True inside a task started by submitit on Slurm (ours, or hydra/launcher=submitit_slurm)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_JOB_ID" in os.environ


def _load_entry(entry: str) -> Callable[[str], int]:
    """'package.module:function'."""
    module_name, _, func = entry.rpartition(":")
    return getattr(importlib.import_module(module_name), func)


def master_port(job_id: str, restart: int) -> int:
    """A port every rank derives alike; it moves with each requeue (the old one may linger)."""
    digits = "".join(ch for ch in job_id if ch.isdigit()) or "0"
    return 20000 + (int(digits) * 7 + restart * 1009) % 12000  # below Linux's ephemeral range


def job_now(job_id: str) -> Tuple[Optional[str], int]:
    """The job's state (RUNNING, COMPLETING...) and its restart count, as the controller has them now.
    A requeue by Slurm (preemption, `scontrol requeue`) counts the restart at once, while the job's
    tasks still run; a cancelled job shows COMPLETING with the count unchanged."""
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None, 0
    fields = dict(re.findall(r"(\w+)=(\S*)", out))
    restarts = fields.get("Restarts", "0")
    return fields.get("JobState"), int(restarts) if restarts.isdigit() else 0


def _requeue_self(job_id: str, max_requeue: int) -> bool:
    """Rank 0, after the trainer saved and returned EXIT_REQUEUE: requeue this job. True if done.
    Each branch says what happens next; the trainer itself only said that it saved."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    state, counted = job_now(job_id)
    if counted > restarts:
        say(f"job {job_id} is being requeued by Slurm (preemption or scontrol requeue); it resumes from the "
            "checkpoint")
        return False
    if state != "RUNNING":
        say(f"job {job_id} is ending ({state}: scancel, or its time limit), so it is not requeued; rerun the "
            "same command to resume from the checkpoint")
        return False
    if restarts >= max_requeue:
        say(f"job {job_id} is not requeued: it was requeued {restarts} times already (cluster.max_requeue="
            f"{max_requeue}); rerun the same command to resume from the checkpoint")
        return False
    # Said before asking: Slurm's SIGTERM for the requeue can end this process before `scontrol` returns.
    say(f"requeued job {job_id} (requeue {restarts + 1} of at most {max_requeue}); it resumes from the checkpoint")
    res = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if res.returncode:
        say(f"scontrol requeue {job_id} failed: {(res.stderr or res.stdout).strip()}: the job was not requeued after "
            "all; rerun the same command to resume from the checkpoint")
        return False
    return True


def run_task(config_path: str, entry: str = ENTRY, max_requeue: int = 3) -> int:
    """Run one rank of the trainer inside a Slurm task. Returns the trainer's exit status."""
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
        say(f"job {env.job_id}: {env.num_tasks} ranks on {env.num_nodes} node(s), master {addr}:{port}, "
            f"restart {restart}")
    rc = int(_load_entry(entry)(str(config_path)))
    if rc != EXIT_REQUEUE:
        return rc
    if env.global_rank != 0:
        # Done, and exiting 0 (see exit_status). Rank 0 may end the step first (exiting with
        # EXIT_REQUEUE makes srun terminate the step): a SIGTERM now must not turn this into a failure.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return rc
    # Stopped for preemption after saving. From here on a SIGTERM (our own requeue) just ends us.
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    if _requeue_self(env.job_id, max_requeue):
        time.sleep(_REQUEUE_WAIT_S)  # Slurm kills this task as it requeues the job
        say(f"job {env.job_id} was not killed {_REQUEUE_WAIT_S} s after its requeue")
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
        return submitit.helpers.DelayedSubmission(self)


class TaskExecutor(submitit.SlurmExecutor):
    """submitit's Slurm executor, with `python -m neox.launch.slurm` as the task's command."""

    @property
    def _submitit_command_str(self) -> str:
        return " ".join([self.python, "-u -m neox.launch.slurm", shlex.quote(str(self.folder))])


def exit_status(result: Any, rank: int) -> int:
    """The task's exit status for the trainer's return value (see the module's docstring)."""
    rc = int(result) if isinstance(result, int) else 0
    if rc == EXIT_REQUEUE and rank != 0:
        return 0
    return rc if 0 <= rc < 256 else 1


def main(argv: List[str]) -> int:
    """One Slurm task: submitit's runner, then exit with the trainer's status."""
    from submitit.core.submission import process_job
    from submitit.core.utils import pickle_load

    process_job(argv[0])  # on an exception submitit saves the traceback and re-raises: status 1
    env = submitit.JobEnvironment()
    outcome, result = pickle_load(env.paths.result_pickle)
    return exit_status(result, env.global_rank) if outcome == "success" else 1
