"""Helpers for the checkpoint tests (imported by name; conftest only holds fixtures): tiny runs through the real launcher (2 CPU processes over gloo),
killing a run's whole process tree by pid, and reading its loss curve."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
# Tiny model, fp32, log every step; warmup 100 and decay_steps 100 keep the lr independent of
# train.steps, so runs of different lengths share one loss curve.
TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.seq_len=64", "train.micro_batch=4",
        "train.log_every=1", "train.eval_every=1000", "train.eval_batches=1", "optim.decay_steps=100",
        "logging.wandb=false", "logging.tensorboard=false", "train.precision=fp32",
        "train.collective_timeout_s=60"]
RUN_TIMEOUT = 300


def _env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/neox/torch_extensions"))
    env.update(extra or {})
    return env


def start(run_dir: Path, *overrides: str, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    keys = {o.split("=", 1)[0] for o in overrides}
    base = [t for t in TINY if t.split("=", 1)[0] not in keys]  # an explicit override replaces the default
    cmd = [sys.executable, str(REPO / "launch.py"), *base, *overrides, f"run_dir={run_dir}"]
    log = open(Path(str(run_dir) + ".log"), "ab")
    return subprocess.Popen(cmd, cwd=REPO, env=_env(env), stdout=log, stderr=subprocess.STDOUT)


def launch(run_dir: Path, *overrides: str, env: Optional[Dict[str, str]] = None,
           timeout: int = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """Run to completion; returns the process with .stdout holding the combined log of this call."""
    log = Path(str(run_dir) + ".log")
    before = log.stat().st_size if log.exists() else 0
    proc = start(run_dir, *overrides, env=env)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait()
        raise AssertionError(f"run {run_dir} did not finish within {timeout} s:\n{tail(log, before)}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, tail(log, before), "")


def tail(log: Path, offset: int = 0) -> str:
    with open(log, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def descendants(pid: int) -> List[int]:
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process we started and every process below it (the launcher, deepspeed, the ranks)."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def train_losses(run_dir: Path) -> Dict[int, float]:
    """step -> train/loss; after a resume the record written last for a step wins."""
    out: Dict[int, float] = {}
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut by kill -9
            continue
        if "train/loss" in rec:
            out[rec["step"]] = rec["train/loss"]
    return out


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: int = RUN_TIMEOUT) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (Path(run_dir) / "metrics.jsonl").exists() and max(train_losses(run_dir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def copy_checkpoints(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    shutil.copytree(Path(src) / "checkpoints", dst / "checkpoints")
    return dst / "checkpoints"
