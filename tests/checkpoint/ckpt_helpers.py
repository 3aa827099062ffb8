"""What the checkpoint tests add to tests/support: the tiny fp32 run they resume, launched into a run
dir (2 CPU processes over gloo unless told), and copies of a run's checkpoints at one tag."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

from support import runs

# fp32, one eval batch; warmup 30 (the preset's) and decay_steps 100 keep the lr independent of
# train.steps, so runs of different lengths share one loss curve.
TINY = runs.tiny("train.eval_batches=1", "optim.warmup_steps=30", "optim.decay_steps=100", "train.precision=fp32",
                 "train.collective_timeout_s=60")


def _args(run_dir: Path, overrides) -> List[str]:
    return runs.tiny(*overrides, base=TINY) + [f"run_dir={run_dir}"]


def start(run_dir: Path, *overrides: str, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    """Start a run in the background (its output appended to <run_dir>.log)."""
    return runs.start(_args(run_dir, overrides), Path(f"{run_dir}.log"), env=env)


def launch(run_dir: Path, *overrides: str, env: Optional[Dict[str, str]] = None,
           timeout: int = runs.RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """Run to its end; .stdout holds the run's stdout and stderr (the lines the tests look for are in either)."""
    proc = runs.launch(_args(run_dir, overrides), timeout=timeout, check=False, env=env)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout + proc.stderr, "")


def at_tag(src: Path, dst: Path, tag: str) -> Path:
    """A new run dir holding `src`'s config and checkpoints up to `tag`, with `latest` naming it."""
    dst.mkdir(parents=True)
    shutil.copy(src / "config.yaml", dst / "config.yaml")
    ckpts = dst / "checkpoints"
    shutil.copytree(src / "checkpoints", ckpts)
    for newer in (p for p in ckpts.iterdir() if p.is_dir() and p.name > tag):
        shutil.rmtree(newer)
    (ckpts / "latest").write_text(tag)
    return dst


def copy_checkpoints(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    shutil.copytree(Path(src) / "checkpoints", dst / "checkpoints")
    return dst / "checkpoints"


def one_process_plan(config_yaml: Path):
    """(config, plan) of a finished run's config on one CPU process, validated by the real make_plan:
    2 micro-batches of 4 keep the global batch of 8 that the 2-process runs train with."""
    from support.plans import cpu

    from neox.config.plan import make_plan
    from neox.train.worker import load_config

    cfg = load_config(str(config_yaml))
    cfg.train.micro_batch, cfg.train.grad_accum, cfg.train.global_batch = 4, 2, None
    plan = make_plan(cfg, cpu(1))
    assert plan.global_batch == 8 and plan.dp == 1, plan
    return cfg, plan
