"""The files of a run dir's `slurm/` folder, and undoing a submission whose job never ran.

A resumed run submits into the folder its earlier jobs wrote their logs to, so a submission owns
only the files it wrote itself:
- submitting job J, submitit writes `J_submission.sh` (the sbatch script), `J_submitted.pkl` (the
  pickled task) and `.submission_file_<uuid>.sh`, a symlink to the script; neox writes `job.json`
  (RECORD: the job last submitted for the run dir);
- each task of J writes `J_<rank>_log.out` and `J_<rank>_log.err` as it starts, and
  `J_<rank>_result.pkl` as it ends.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

from neox.config.run_files import PENDING_CONFIG
from neox.launch.rundir import LOCK_NAME

RECORD = "job.json"  # <run_dir>/slurm/job.json: the job last submitted for this run dir


def never_started(log_dir: Path, job_id: str) -> bool:
    """No task of the job ever ran: it has no log and no result."""
    return not any(log_dir.glob(f"{job_id}_*_log.*")) and not any(log_dir.glob(f"{job_id}_*_result.pkl"))


def _names_job(path: Path, key: str, job_id: str) -> bool:
    """The JSON file at `path` (a job record, the run dir's lock) names `job_id` under `key`."""
    try:
        return str(json.loads(path.read_text()).get(key)) == str(job_id)
    except (OSError, ValueError, AttributeError):
        return False


def submission_files(log_dir: Path, job_id: str) -> List[Path]:
    """The files submitting `job_id` wrote into `log_dir` that are still there (see the module's docstring)."""
    script = log_dir / f"{job_id}_submission.sh"
    files = [script, log_dir / f"{job_id}_submitted.pkl"]
    files += [p for p in log_dir.glob(".submission_file_*.sh")
              if p.is_symlink() and Path(os.readlink(p)).name == script.name]
    if _names_job(log_dir / RECORD, "job_id", job_id):
        files.append(log_dir / RECORD)
    return [p for p in files if p.is_symlink() or p.is_file()]


def remove_unstarted(run_dir: Path, job_id: Optional[str] = None, before: Optional[set] = None) -> None:
    """Undo what a submission that never ran left behind, and nothing else: in slurm/, the files
    submitting `job_id` wrote (`submission_files`), or, for a submission refused before it had a job
    id, the names not in `before`; the config written for the job; the run dir's lock when it names
    this job (which has ended); then slurm/ and the run dir themselves once empty. An earlier job's
    logs (a resumed run) and the lock a live launch holds stay."""
    log_dir = run_dir / "slurm"
    if log_dir.is_dir():
        if before is not None:
            ours = [p for p in log_dir.iterdir() if p.name not in before and (p.is_file() or p.is_symlink())]
        else:
            ours = submission_files(log_dir, job_id) if job_id else []
        for path in ours:
            path.unlink(missing_ok=True)
        if not any(log_dir.iterdir()):
            log_dir.rmdir()
    (run_dir / PENDING_CONFIG).unlink(missing_ok=True)
    lock = run_dir / LOCK_NAME
    if job_id and _names_job(lock, "slurm_job", job_id):
        lock.unlink(missing_ok=True)
    try:
        run_dir.rmdir()  # only when empty
    except OSError:
        pass
