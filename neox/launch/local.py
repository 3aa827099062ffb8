"""Start workers through the real `deepspeed` launcher: this machine's GPUs, CPU processes over gloo,
or several machines from a hostfile."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

from omegaconf import DictConfig

from neox.config.plan import RunPlan
from neox.errors import LaunchError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_command(cluster: DictConfig, plan: RunPlan, config_path: Path, port: int) -> List[str]:
    exe = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    if not os.path.exists(exe):
        raise LaunchError("the `deepspeed` launcher is not on PATH; install neox with "
                          "`pip install --no-build-isolation -e .` in this environment")
    cmd = [exe, "--master_port", str(port), "--no_local_rank"]
    if cluster.kind == "hostfile":
        cmd += ["--hostfile", os.path.expanduser(cluster.hostfile), "--launcher", cluster.launcher]
        if cluster.master_addr:
            cmd += ["--master_addr", cluster.master_addr]
        cmd += ["--num_nodes", str(plan.resources.nodes), "--num_gpus", str(plan.world_size // plan.resources.nodes)]
    elif plan.device == "cuda" and (cluster.include or cluster.exclude):
        from neox.launch.resources import local_gpu_count, local_gpu_selection

        ids = local_gpu_selection(cluster, local_gpu_count())[: plan.world_size]
        cmd += ["--include", "localhost:" + ",".join(map(str, ids))]
    else:
        # On CPU, --num_gpus N starts N processes over gloo (--include fails there).
        cmd += ["--num_gpus", str(plan.world_size)]
    return cmd + ["--module", "neox.train", str(config_path)]


def worker_env(plan: RunPlan) -> dict:
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        # The deepspeed launcher leaves it unset; CPU steps run ~10x slower oversubscribed.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, plan.resources.slots_per_node)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/neox/torch_extensions"))
    return env


def clean_shm(port: int) -> None:
    """DeepSpeed's CPU all-reduce leaves /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        try:
            os.unlink(path)
        except OSError:
            pass


def run(cluster: DictConfig, plan: RunPlan, config_path: Path) -> int:
    """Run the workers to completion and return their exit status."""
    port = cluster.master_port or free_port()
    cmd = deepspeed_command(cluster, plan, config_path, port)
    print(f"launching {plan.world_size} workers: {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, env=worker_env(plan), start_new_session=True)
    # The workers run in their own session; pass a SIGTERM (scheduler, timeout) on to all of them.
    previous = signal.signal(signal.SIGTERM, lambda signum, _: os.killpg(proc.pid, signum))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        clean_shm(port)
