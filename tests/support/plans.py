"""Real run plans: a config composed like `launch.py OVERRIDES` and validated by `make_plan`."""
from __future__ import annotations

from typing import List, Optional, Tuple

from omegaconf import DictConfig

from neox.config.plan import Resources, RunPlan, make_plan
from neox.launch.compose import compose_config


def cpu(slots: int) -> Resources:
    """This machine as the launcher sees it with cluster.cpu_procs=slots."""
    return Resources(kind="local", device="cpu", slots=slots, slots_per_node=slots)


def plan_of(overrides: List[str], resources: Optional[Resources] = None) -> Tuple[DictConfig, RunPlan]:
    """(config, plan) for `launch.py OVERRIDES` on `resources` (default: one CPU process per rank
    the layout asks for, else one)."""
    cfg = compose_config(overrides)
    if resources is None:
        p = cfg.parallelism
        resources = cpu(p.tp * p.pp * (p.dp or 1))
    return cfg, make_plan(cfg, resources)
