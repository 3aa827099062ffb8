"""Helpers for tests that run launch.py (a unique module name: several conftest.py files exist)."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[1]

# A model small enough that a few steps on 2 CPU processes take seconds.
TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.seq_len=64",
        "train.micro_batch=4", "train.grad_accum=1", "train.log_every=1", "train.eval_every=1000",
        "train.eval_batches=2", "logging.wandb=false", "logging.tensorboard=false", "optim.warmup_steps=2"]


def shm_files() -> set:
    return set(glob.glob("/dev/shm/deepspeed*"))


def launch(args: List[str], timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python launch.py ARGS` in a subprocess; fail the test on timeout or (if check) error."""
    before = shm_files()
    proc = subprocess.run([sys.executable, str(REPO / "launch.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ))
    leaked = shm_files() - before
    for path in leaked:
        os.unlink(path)
    assert not leaked, f"the run left DeepSpeed buffers in /dev/shm: {sorted(leaked)}"
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.py {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(run_dir: Path) -> List[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> List[tuple]:
    return [(r["step"], r["train/loss"]) for r in read_metrics(run_dir) if "train/loss" in r]
