"""Command line of launch.py: validate every (swept) config first, then run or hand the sweep to Hydra."""
from __future__ import annotations

import contextlib
import io
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List

from omegaconf import DictConfig, OmegaConf

from neox.config.plan import default_run_dir
from neox.errors import ConfigError, NeoxError
from neox.launch.compose import CONF_DIR, compose_config, plan_shorthand, sweep_combinations
from neox.launch import planning
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
            check_distinct_run_dirs(configs)
            for cfg in configs:
                plan_for(prepared_quietly(cfg))
    except NeoxError as exc:
        return fail(exc)
    if not multirun:
        return guarded(run_job, configs[0])
    return _hydra_multirun(plan_shorthand(argv), configs)  # Hydra reads the arguments again


def prepared_quietly(cfg: DictConfig) -> DictConfig:
    """The config a job will plan (its micro-batch sized, parallelism=auto resolved: a memory check at the
    default micro-batch could refuse a job that would run), without the lines each job prints when it starts."""
    with contextlib.redirect_stdout(io.StringIO()):
        return planning.prepare(cfg)


def check_distinct_run_dirs(configs: List[DictConfig]) -> None:
    """Refuse a sweep whose jobs would share a run dir (they would overwrite each other's config,
    metrics and checkpoints). Jobs without run_dir get Hydra's hydra.sweep.dir/<job number>."""
    seen: Dict[Path, int] = {}
    for num, cfg in enumerate(configs):
        if cfg.run_dir is None:
            continue
        run_dir = Path(cfg.run_dir).expanduser().absolute()
        if run_dir in seen:
            raise ConfigError(
                f"sweep jobs {seen[run_dir]} and {num} would both run in run_dir={cfg.run_dir}: leave run_dir out "
                "and set hydra.sweep.dir=<dir> (each job gets <dir>/<job number>), or make run_dir differ per "
                "job, e.g. 'run_dir=runs/lr_${optim.lr}' (in single quotes)")
        seen[run_dir] = num


def _hydra_multirun(argv: List[str], configs: List[DictConfig]) -> int:
    """Hand the sweep to Hydra's launcher (basic: one job after another here; submitit: Slurm jobs).

    With cluster=slurm and the basic launcher each run is submitted without waiting, so the jobs
    run in parallel, and the sweep then waits for all of them here."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from neox.config.schema import register_configs

    register_configs()
    statuses: List[int] = []
    submitted: List[Path] = []  # run dirs of the Slurm jobs this sweep waits for
    own_launcher = any(a.startswith("hydra/launcher=") and a != "hydra/launcher=basic" for a in argv)
    to_slurm = configs[0].cluster.kind == "slurm" and not own_launcher

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def task(cfg: DictConfig) -> int:
        if cfg.cluster.kind == "slurm":  # the Slurm job's name: the run's name and the sweep index
            name = default_run_dir(cfg).name if cfg.run_name is None else cfg.run_name
            cfg.run_name = f"{name}_{HydraConfig.get().job.num}"
        if cfg.run_dir is None:
            cfg.run_dir = HydraConfig.get().runtime.output_dir
        waits = to_slurm and cfg.cluster.wait
        if waits:
            cfg.cluster.wait = False  # submit now, wait below with the others
        status = guarded(run_job, cfg)
        statuses.append(status)
        if waits and status == 0 and not cfg.dry_run:
            submitted.append(default_run_dir(cfg))
        return status

    saved = sys.argv
    sys.argv = [saved[0]] + argv + (_job_name(configs) if own_launcher else [])
    try:
        if to_slurm:
            print(f"Submitting the {len(configs)} runs of this sweep as {len(configs)} Slurm jobs", flush=True)
        with _quiet_local_launch_line(to_slurm):
            task()
    finally:
        sys.argv = saved
    from neox.launch import slurm

    slurm_failed = slurm.wait_for(submitted) != 0
    failed = sum(1 for s in statuses if s != 0)
    if failed:
        print(f"neox: {failed} of {len(statuses)} sweep jobs failed", file=sys.stderr)
    return 1 if failed or slurm_failed else 0


def _job_name(configs: List[DictConfig]) -> List[str]:
    """hydra/launcher=submitit_slurm names its jobs after hydra.job.name ("cli" here): the run's name."""
    names = {cfg.run_name or default_run_dir(cfg).name for cfg in configs}
    return [f"hydra.job.name={names.pop() if len(names) == 1 else 'neox-sweep'}"]


@contextmanager
def _quiet_local_launch_line(quiet: bool) -> Iterator[None]:
    """Hydra's basic launcher logs "Launching N jobs locally"; with cluster=slurm they go to Slurm."""
    import logging

    logger = logging.getLogger("hydra._internal.core_plugins.basic_launcher")

    def drop(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Launching ")

    if quiet:
        logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
