"""Helpers for the Slurm tests: real run configs (composed with cluster=slurm, as launch.py does) and
their real plans, for the stand-in worker; the stand-in's step log; polling."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from neox.launch.compose import compose_config
from neox.launch.job import plan_for  # noqa: F401 - the plan launch.py makes: make_plan on the cluster's resources

STANDIN = "slurm_standin:run"  # importable in the jobs: the `slurm` fixture puts tests/slurm on PYTHONPATH


def make_cfg(run_dir: Path, steps: int = 12, save_every: int = 4, step_sleep: float = 0.0,
             overrides: Sequence[str] = (), **cluster) -> DictConfig:
    """`launch.py cluster=slurm OVERRIDES` for `run_dir`, CPU tasks (2 per node) unless `cluster`
    says otherwise, plus a `standin` section for the stand-in worker (step_sleep, raise_at)."""
    fields = dict(gpus_per_node=0, tasks_per_node=2, cpus_per_task=1, time_min=30, signal_delay_s=5)
    fields.update(cluster)
    cfg = compose_config(["cluster=slurm", *overrides, f"train.steps={steps}", f"train.save_every={save_every}",
                          f"run_dir={run_dir}", f"run_name={run_dir.name}"])
    for key, value in fields.items():
        cfg.cluster[key] = value
    with open_dict(cfg):
        cfg.standin = {"step_sleep": step_sleep, "raise_at": None}
    return cfg


def write_config(cfg, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    OmegaConf.save(cfg, path)
    return path


def steps_log(run_dir: Path) -> list:
    path = run_dir / "steps.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_until(pred, timeout: float, what: str, poll: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def slurm_record(job_id) -> dict:
    """What Slurm itself records for the job: {'JobState': ..., 'ExitCode': ..., 'JobName': ...}."""
    out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))
