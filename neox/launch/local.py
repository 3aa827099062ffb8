"""Start workers through the real `deepspeed` launcher: this machine's GPUs, CPU processes over gloo,
or several machines from a hostfile."""
from __future__ import annotations

import errno
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Sequence

from neox.config.plan import RunPlan
from neox.config.run_files import LAUNCHED_AT, SPAWNED_AT, process_started
from neox.config.schema import LocalCluster
from neox.errors import LaunchError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_master_port(cluster: LocalCluster) -> None:
    """A given cluster.master_port must be free here (rank 0 listens on it); without one a free port
    is picked. Checked before anything starts: otherwise every rank fails after its imports."""
    port = cluster.master_port
    if not port:
        return
    with socket.socket() as s:
        # SO_REUSEADDR: a port a finished run left in TIME_WAIT is usable, only a listener conflicts
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", int(port)))
        except OverflowError:
            raise LaunchError(f"cluster.master_port={port} is not a port (1-65535); leave it unset to use a "
                              "free one") from None
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise LaunchError(f"cluster.master_port={port} cannot be used here: {exc.strerror or exc}; "
                                  "leave it unset to use a free one") from None
            raise LaunchError(f"cluster.master_port={port} is already in use on this machine (another run or "
                              "service listens on it): pick another port, or leave cluster.master_port unset "
                              "to use a free one") from None


def deepspeed_command(plan: RunPlan, config_path: Path, port: int) -> List[str]:
    """The deepspeed launcher's command for the plan's cluster section (local or hostfile)."""
    cluster = plan.config.cluster
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
    elif plan.device == "cuda":
        from neox.launch.resources import local_gpu_count, local_gpu_selection

        ids = local_gpu_selection(cluster, local_gpu_count())[: plan.world_size]
        cmd += ["--include", "localhost:" + ",".join(physical_gpu_ids(ids, os.environ.get("CUDA_VISIBLE_DEVICES")))]
    else:
        # On CPU, --num_gpus N starts N processes over gloo (--include fails there).
        cmd += ["--num_gpus", str(plan.world_size)]
    return cmd + ["--module", "neox.train", str(config_path)]


def physical_gpu_ids(ids: List[int], visible: str | None) -> List[str]:
    """The deepspeed launcher sets the workers' CUDA_VISIBLE_DEVICES from --include and ignores the user's,
    so ids counted among the visible GPUs are turned back into the machine's own (CUDA_VISIBLE_DEVICES=2,3
    with cluster.gpus=1 is GPU 2, never GPU 0)."""
    if visible is None or not visible.strip():
        return [str(i) for i in ids]
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    if not all(v.isdigit() for v in entries):
        raise LaunchError(f"CUDA_VISIBLE_DEVICES={visible} names GPUs by UUID; the deepspeed launcher takes "
                          "indices: set CUDA_VISIBLE_DEVICES to GPU indices (nvidia-smi -L lists them)")
    return [entries[i] for i in ids]


def worker_env(plan: RunPlan) -> dict:
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        # The deepspeed launcher leaves it unset; CPU steps run ~10x slower oversubscribed.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, plan.resources.slots_per_node)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/neox/torch_extensions"))
    env[LAUNCHED_AT] = f"{process_started():.3f}"  # the workers' start-up breakdown begins at `python launch.py`
    env[SPAWNED_AT] = f"{time.time():.3f}"  # made right before the deepspeed launcher starts
    return env


def clean_shm(port: int) -> None:
    """DeepSpeed's CPU all-reduce leaves /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        try:
            os.unlink(path)
        except OSError:
            pass


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C: pass SIGINT to the workers' session (the ranks exit at once, quietly: see
    neox.train.failures), then wait; a second Ctrl-C, or 30 s, ends them with SIGKILL."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run(plan: RunPlan, config_path: Path, keep_fds: Sequence[int] = ()) -> int:
    """Run the workers to completion and return their exit status. `keep_fds` stay open in the
    deepspeed launcher (the run dir's lock: held while the workers run, even if this process dies).
    Ctrl-C stops the workers and is raised again as KeyboardInterrupt once they are gone."""
    port = plan.config.cluster.master_port or free_port()
    cmd = deepspeed_command(plan, config_path, port)
    print(f"launching {plan.world_size} workers: {' '.join(cmd)}", flush=True)
    # The deepspeed runner starts with SIGINT ignored (an ignored signal stays ignored across exec):
    # it has no handler of its own and would print a KeyboardInterrupt traceback. Its child,
    # deepspeed's launch.py, installs its own handler, and the workers start with the default again.
    interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(cmd, env=worker_env(plan), start_new_session=True, pass_fds=tuple(keep_fds))
    finally:
        signal.signal(signal.SIGINT, interrupt)
    # The workers run in their own session; pass a SIGTERM (scheduler, timeout) on to all of them.
    previous = signal.signal(signal.SIGTERM, lambda signum, _: os.killpg(proc.pid, signum))
    try:
        status = proc.wait()
    except KeyboardInterrupt:
        _stop(proc)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        clean_shm(port)
    if status == 256 - signal.SIGKILL:  # deepspeed's launch.py exits with a rank's -9 as 247
        print("neox: a worker was killed with SIGKILL: most often by the kernel's out-of-memory killer (see "
              "`dmesg`); if so, lower train.micro_batch, set model.activation_checkpointing=full, or spread the "
              "model with parallelism.tp/pp", file=sys.stderr, flush=True)
    return status
