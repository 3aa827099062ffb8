"""Tiny runs through the real launcher (`python launch.py ...`: deepspeed, CPU processes, gloo), or
their workers alone (`workers()`) where the launcher is not what is tested."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from support.procs import free_port, kill_tree, master_ports, no_shm_leak

REPO = Path(__file__).resolve().parents[2]

# A model small enough that a few steps on 2 CPU processes take seconds.
TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.seq_len=64",
        "train.micro_batch=4", "train.grad_accum=1", "train.log_every=1", "train.eval_every=1000",
        "train.eval_batches=2", "logging.wandb=false", "logging.tensorboard=false", "optim.warmup_steps=2"]
RUN_TIMEOUT = 300


def tiny(*overrides: str, base: List[str] = TINY) -> List[str]:
    """`base` + overrides, where an override of a key in `base` replaces it (Hydra would refuse both)."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [o for o in base if o.split("=", 1)[0] not in keys] + list(overrides)


def run_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def launch(args: List[str], timeout: int = RUN_TIMEOUT, check: bool = True,
           env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run `python launch.py ARGS` to its end (stdout and stderr captured). Fails the test on a
    timeout (after killing the whole process tree), on DeepSpeed files left in /dev/shm, and, with
    `check`, on a non-zero exit."""
    out = err = ""  # read by `ports` when the body ends: only this run's buffers are its own
    with no_shm_leak(f"launch.py {' '.join(args)}", ports=lambda: master_ports(out + err)):
        proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), *args], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=run_env(env))
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            out, err = proc.communicate()
            raise AssertionError(f"launch.py {' '.join(args)} did not finish within {timeout} s\n"
                                 f"stdout:\n{out[-4000:]}\nstderr:\n{err[-4000:]}")
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.py {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{out[-4000:]}\nstderr:\n{err[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def workers(args: List[str], timeout: int = RUN_TIMEOUT,
            env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """The run's workers alone, for tests of what the workers do: the config composed and saved as
    launch.py writes it, then `python -m neox.train <run_dir>/config.yaml` on each of the plan's
    processes with the environment the launcher gives them (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT). It saves the launcher's start-up, ~6 s of CPU a run (launch.py, the
    deepspeed runner and deepspeed's launcher each import torch); what the launcher itself does is
    tested with launch(). Returns the first non-zero exit status (else 0); stdout and stderr are every
    rank's, rank 0's first. A rank still running 30 s after another failed is killed, as the launcher
    does (it would wait in a collective for the dead one). Fails the test on a timeout, after killing
    every rank."""
    from neox.launch.compose import compose_config
    from neox.launch.job import plan_for, save_config

    cfg = compose_config(args)
    plan = plan_for(cfg)
    run_dir = Path(plan.run_dir)
    config = save_config(cfg, run_dir)
    port = free_port()
    logs = [(run_dir.with_name(f"{run_dir.name}.rank{r}.out"), run_dir.with_name(f"{run_dir.name}.rank{r}.err"))
            for r in range(plan.world_size)]  # files, not pipes: a full pipe would stall a rank mid-collective
    procs = []
    for rank, (out, err) in enumerate(logs):
        rank_env = {**(env or {}), "RANK": str(rank), "WORLD_SIZE": str(plan.world_size), "LOCAL_RANK": str(rank),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        with open(out, "w") as o, open(err, "w") as e:
            procs.append(subprocess.Popen([sys.executable, "-u", "-m", "neox.train", str(config)], cwd=REPO,
                                          stdout=o, stderr=e, env=run_env(rank_env)))
    deadline, failed_at = time.monotonic() + timeout, None
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise AssertionError(f"the workers of {' '.join(args)} did not finish within {timeout} s\n"
                                     + "".join(e.read_text()[-2000:] for _, e in logs))
            if failed_at is None and any(p.returncode for p in procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > 30:
                break  # the rest are killed below
            time.sleep(0.1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()
    status = next((p.returncode for p in procs if p.returncode), 0)
    return subprocess.CompletedProcess(args, status, "".join(o.read_text() for o, _ in logs),
                                       "".join(e.read_text() for _, e in logs))


def start(args: List[str], log: Path, env: Optional[Dict[str, str]] = None,
          new_session: bool = False) -> subprocess.Popen:
    """Start `python launch.py ARGS` in the background, its stdout and stderr appended to `log`.
    The caller ends it (`kill_tree(proc.pid)`, or `os.killpg` with new_session=True)."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, str(REPO / "launch.py"), *args], cwd=REPO, env=run_env(env),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=new_session)


def read_metrics(run_dir: Path) -> List[dict]:
    """The records of metrics.jsonl (a last line cut by a kill is left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def train_losses(run_dir: Path) -> Dict[int, float]:
    """step -> train/loss, in step order; after a resume the record written last for a step wins."""
    out = {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}
    return dict(sorted(out.items()))


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> None:
    """Wait until the run logged `step`'s training loss; fail if it ended or time ran out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(train_losses(run_dir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached within {timeout} s")


def at_checkpoint(src: Path, dst: Path, tag: str) -> Path:
    """A new run dir holding `src`'s config and its checkpoints up to `tag`, with `latest` naming it:
    what `src` looked like right after saving `tag` (its metrics excepted)."""
    dst.mkdir(parents=True)
    shutil.copy(Path(src) / "config.yaml", dst / "config.yaml")
    ckpts = dst / "checkpoints"
    shutil.copytree(Path(src) / "checkpoints", ckpts)
    for newer in (p for p in ckpts.iterdir() if p.is_dir() and p.name > tag):
        shutil.rmtree(newer)
    (ckpts / "latest").write_text(tag)
    return dst
