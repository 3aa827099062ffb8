"""Command line of launch.py: validate every (swept) config first, then run or hand the sweep to Hydra."""
from __future__ import annotations

import sys
from typing import Callable, List

from omegaconf import DictConfig, OmegaConf

from neox.errors import NeoxError
from neox.launch.compose import CONF_DIR, compose_config, sweep_combinations
from neox.launch.job import plan_for, run_job

USAGE = """usage: python launch.py [-m] [key=value ...]

  group choices   model=<conf/model/*>  parallelism=<conf/parallelism/*>  cluster=local|hostfile|slurm  data=<conf/data/*>
  any field       train.steps=200  optim.lr=3e-4  model.seq_len=512  run_dir=runs/mine
  dry_run=true    validate and print the summary, launch nothing
  -m              sweep comma-separated values (e.g. optim.lr=1e-4,3e-4), one run dir per job
  --cfg job       print the composed config (every field with its value)
"""


def fail(exc: NeoxError) -> int:
    print(f"neox: error: {exc}", file=sys.stderr, flush=True)
    return 2


def guarded(fn: Callable[[DictConfig], int], cfg: DictConfig) -> int:
    try:
        return fn(cfg)
    except NeoxError as exc:
        return fail(exc)


def main(argv: List[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    multirun = any(a in ("-m", "--multirun") for a in argv)
    show_cfg = "--cfg" in argv
    overrides = [a for a in argv if not a.startswith("-") and a not in ("job", "all", "hydra")]
    try:
        combos = list(sweep_combinations(overrides))
        if len(combos) > 1 and not multirun:
            return fail(NeoxError("comma-separated values sweep several runs: add -m (python launch.py -m ...)"))
        configs = [compose_config(c) for c in combos]
        if show_cfg:
            print(OmegaConf.to_yaml(configs[0]))
            return 0
        if multirun:  # validate every job before the first one starts
            for cfg in configs:
                plan_for(cfg)
    except NeoxError as exc:
        return fail(exc)
    if not multirun:
        return guarded(run_job, configs[0])
    return _hydra_multirun(argv)


def _hydra_multirun(argv: List[str]) -> int:
    """Hand the sweep to Hydra's launcher (basic: one job after another here; submitit: Slurm jobs)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from neox.config.schema import register_configs

    register_configs()
    statuses: List[int] = []

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def task(cfg: DictConfig) -> int:
        if cfg.run_dir is None:
            cfg.run_dir = HydraConfig.get().runtime.output_dir
        status = guarded(run_job, cfg)
        statuses.append(status)
        return status

    saved = sys.argv
    sys.argv = [saved[0]] + argv
    try:
        task()
    finally:
        sys.argv = saved
    from neox.launch import slurm

    # cluster=slurm submitted each job without waiting, so the sweep runs in parallel; wait for all
    # of them here (each one's outcome is printed; a no-op when nothing went to Slurm).
    slurm_failed = slurm.wait_pending() != 0
    failed = sum(1 for s in statuses if s != 0)
    if failed:
        print(f"neox: {failed} of {len(statuses)} sweep jobs failed", file=sys.stderr)
    return 1 if failed or slurm_failed else 0
