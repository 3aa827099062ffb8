"""One run: resources -> plan -> summary -> saved config -> workers."""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from neox.config.plan import RunPlan, make_plan
from neox.launch import local, resources, summary


def plan_for(cfg: DictConfig) -> RunPlan:
    """Validate the config against what this launch can use."""
    return make_plan(cfg, resources.detect(cfg.cluster))


def save_config(cfg: DictConfig, run_dir: Path) -> Path:
    """Write the resolved config the workers read (atomically: a reader never sees half a file)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    tmp = path.with_suffix(f".yaml.{os.getpid()}.tmp")  # several Slurm tasks may write it at once
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tmp.replace(path)
    return path


def run_job(cfg: DictConfig) -> int:
    """Plan, print the summary and dispatch; returns the workers' exit status."""
    plan = plan_for(cfg)
    print(summary.render(cfg, plan), flush=True)
    if cfg.dry_run:
        print("dry run: config valid, nothing launched")
        return 0
    cfg = cfg.copy()
    cfg.run_dir = str(plan.run_dir)
    config_path = save_config(cfg, plan.run_dir)
    if cfg.cluster.kind == "slurm":
        from neox.launch import slurm

        return slurm.submit(cfg, plan, config_path, plan.run_dir)
    return local.run(cfg.cluster, plan, config_path)
