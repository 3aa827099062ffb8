"""Helpers for the Slurm tests (configs for the stand-in worker, the step log, polling)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

from omegaconf import OmegaConf

from neox.config.schema import ParallelConfig, SlurmCluster, TrainConfig

STANDIN = "slurm_standin:run"  # importable in the jobs: the `slurm` fixture puts tests/slurm on PYTHONPATH


def make_cfg(run_dir: Path, steps: int = 12, save_every: int = 4, step_sleep: float = 0.0, **cluster):
    """A run config for the stand-in worker: cfg.cluster is a SlurmCluster (CPU tasks)."""
    cl = dict(gpus_per_node=0, tasks_per_node=2, cpus_per_task=1, time_min=30, signal_delay_s=5)
    cl.update(cluster)
    cfg = OmegaConf.create(
        {
            "run_name": run_dir.name,
            "run_dir": str(run_dir),
            "cluster": OmegaConf.structured(SlurmCluster(**cl)),
            "train": OmegaConf.structured(TrainConfig(steps=steps, save_every=save_every)),
            "parallelism": OmegaConf.structured(ParallelConfig(name="dp")),
            "standin": {"step_sleep": step_sleep},
        }
    )
    return cfg


def write_config(cfg, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    OmegaConf.save(cfg, path)
    return path


def plan_for(cfg) -> SimpleNamespace:
    world = int(cfg.cluster.nodes) * int(cfg.cluster.tasks_per_node or 1)
    return SimpleNamespace(world_size=world, tp=1, pp=1, dp=world)


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
