"""The config a worker starts from, and handing it on as the run dir's config.yaml.

The launcher writes `<run_dir>/config.pending.yaml`; once the run has started (checkpoint loaded,
data opened) rank 0 makes it `config.yaml`, so a launch the workers refuse leaves the old one.
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from neox.config.run_files import PENDING_CONFIG
from neox.config.schema import RunConfig


def load_config(path: str) -> DictConfig:
    """The config file onto the schema (unknown keys refused); `neox.config.plan.make_plan` types it."""
    return OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path))


def config_to_read(config_path: str) -> Path:
    """The launcher's pending config; after rank 0 made it config.yaml (a requeued Slurm job runs
    the same command again), config.yaml."""
    path = Path(config_path)
    if path.name == PENDING_CONFIG and not path.exists() and (path.parent / "config.yaml").is_file():
        return path.parent / "config.yaml"
    return path


def publish_config(config_path: Path, run_dir: Path) -> None:
    """The run has started with this config: make it the run dir's config.yaml (rank 0)."""
    pending = run_dir / PENDING_CONFIG
    if config_path.name == PENDING_CONFIG and config_path.resolve() == pending.resolve() and pending.exists():
        os.replace(pending, run_dir / "config.yaml")
