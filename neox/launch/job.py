"""One run: resources -> plan -> summary -> run-dir checks -> run-dir lock -> config -> workers.

Nothing in the run dir is written before this launch owns it (neox.launch.rundir), and a launch
the workers refuse at start leaves `config.yaml` as it was: the workers read `config.pending.yaml`
and rank 0 moves it to `config.yaml` only once the run has started (checkpoint loaded, data
opened; see neox.train.config_files.publish_config).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from neox.config.plan import RunPlan, config_dict, make_plan
from neox.errors import EXIT_INTERRUPTED, LaunchError
from neox.launch import local, planning, resources, summary
from neox.launch.rundir import PENDING_CONFIG, RunDirLock



def plan_for(cfg: DictConfig) -> RunPlan:
    """Validate the config against what this launch can use; what follows reads the plan alone."""
    return make_plan(cfg, resources.detect(cfg.cluster))


def save_config(cfg: DictConfig, run_dir: Path, name: str = "config.yaml") -> Path:
    """Write the resolved config the workers read (atomically: a reader never sees half a file)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    tmp = path.with_name(f".{name}.{os.getpid()}.tmp")  # several Slurm tasks may write it at once
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tmp.replace(path)
    return path


def check_run_dir(plan: RunPlan) -> None:
    """What the workers would refuse at start about the run dir, refused here first (one line): a
    config or checkpoints path that cannot be written, and a resume with a different model shape."""
    from neox.checkpoint import CheckpointManager, check_resume_config
    from neox.errors import CheckpointError

    for name in ("config.yaml", PENDING_CONFIG):
        if os.path.isdir(plan.run_dir / name):
            raise LaunchError(f"{plan.run_dir / name} is a directory; the run's config is written there: "
                              "move it away and rerun")
    manager = CheckpointManager(plan.run_dir / "checkpoints", plan.config.train.keep_checkpoints, is_main=True)
    manager.check_usable()
    for tag in manager.candidates():  # the first one with a readable state is what the workers load
        try:
            saved = manager.read_state(tag)
        except CheckpointError:
            continue  # missing or damaged: the workers verify it and fall back, saying so
        if "config" in saved:
            check_resume_config(saved["config"], config_dict(plan.config))
        return


def interrupted(plan: Optional[RunPlan], local_workers: bool) -> int:
    """Ctrl-C: say what was kept and how to go on."""
    if plan is None:
        print("neox: interrupted before launching; nothing was written", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    from neox.checkpoint.manager import read_latest, step_of

    tag = read_latest(plan.run_dir / "checkpoints")[0]
    kept = (f"the last checkpoint is {plan.run_dir / 'checkpoints' / tag} (step {step_of(tag)})" if tag else
            "no checkpoint was saved yet, so a rerun starts from step 1")
    stopped = "the workers are stopped; " if local_workers else ""
    print(f"neox: interrupted: {stopped}{kept}; rerun the same command to resume", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def run_job(cfg: DictConfig) -> int:
    """Plan, print the summary and dispatch; returns the workers' exit status."""
    plan = None
    try:
        cfg = planning.prepare(cfg)  # parallelism=auto resolved, plan=true planned as a dry run (neox/planner)
        plan = plan_for(cfg)
        print(summary.render(plan), flush=True)
        if planning.review(plan):  # plan=true: the planner's report, nothing launched; refuses what cannot fit
            return 0
        check_run_dir(plan)
        if plan.config.dry_run:
            print("dry run: config valid, nothing launched")
            return 0
        cfg = cfg.copy()  # what config.yaml records: the run dir made explicit
        cfg.run_dir = str(plan.run_dir)
        with RunDirLock(plan.run_dir) as lock:
            check_run_dir(plan)  # again: the run dir cannot change under us any more
            return _dispatch(cfg, plan, lock)
    except KeyboardInterrupt:
        return interrupted(plan, local_workers=cfg.cluster.kind != "slurm")


def _dispatch(cfg: DictConfig, plan: RunPlan, lock: RunDirLock) -> int:
    """Write `cfg` (the config the workers read) and start them as `plan` says."""
    kind = plan.config.cluster.kind
    if kind == "slurm":
        from neox.launch import slurm

        # A requeued or still-starting job reads this file; it becomes config.yaml once the job runs.
        return slurm.submit(plan, save_config(cfg, plan.run_dir, PENDING_CONFIG), plan.run_dir, lock=lock)
    if kind == "local":
        local.check_master_port(plan.config.cluster)
    config_path = save_config(cfg, plan.run_dir, PENDING_CONFIG)
    try:
        return local.run(plan, config_path, keep_fds=(lock.fd,) if lock.fd is not None else ())
    finally:
        config_path.unlink(missing_ok=True)  # still there: the workers refused it
