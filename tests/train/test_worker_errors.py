"""Out of memory is told apart from a failed collective, on CPU and CUDA (issue 13, item 9 / #9).

Before: every RuntimeError in the worker read "a collective failed ...: a peer rank died or hung",
also out of memory on a one-process run. The errors classified here are real ones: the CPU
allocator refusing 2**60 bytes, and an allocation over an address-space limit (RLIMIT_AS)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from neox.train.failures import is_out_of_memory, out_of_memory_message
from support.procs import cmdline, descendants, kill_tree
from support.runs import REPO, TINY, tiny, train_losses, workers


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the test wants whatever was raised
        return exc
    raise AssertionError("nothing was raised")


def test_real_cpu_allocator_failure_is_out_of_memory():
    exc = _raised(lambda: torch.empty((1 << 60,), dtype=torch.uint8))
    assert type(exc) is RuntimeError and "DefaultCPUAllocator" in str(exc)
    assert is_out_of_memory(exc)


def test_python_memory_error_and_cuda_oom_are_out_of_memory():
    assert is_out_of_memory(MemoryError())
    cuda_oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                           "capacity of 79.11 GiB of which 3.12 GiB is free.")
    assert isinstance(cuda_oom, RuntimeError) and is_out_of_memory(cuda_oom)
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be ..."))


@pytest.mark.parametrize("text", [
    "Connection closed by peer [127.0.0.1]:29500",
    "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 60000ms for recv operation",
    "NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error",
    "Expected all tensors to be on the same device",
])
def test_collective_and_other_failures_are_not_out_of_memory(text):
    assert not is_out_of_memory(RuntimeError(text))
    assert not is_out_of_memory(ValueError("out of memory"))  # only what allocators raise


RLIMIT = textwrap.dedent("""
    import re, resource, torch
    from neox.train.failures import is_out_of_memory
    size = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + (256 << 20), resource.RLIM_INFINITY))
    try:
        torch.ones((1 << 30,), dtype=torch.float32)  # 4 GiB, over the 256 MiB left
    except BaseException as exc:
        print(type(exc).__name__, is_out_of_memory(exc), str(exc).splitlines()[0][:200])
""")


def test_allocation_over_an_address_space_limit_is_out_of_memory():
    proc = subprocess.run([sys.executable, "-c", RLIMIT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("RuntimeError True ") and "can't allocate memory" in proc.stdout, proc.stdout


def test_message_names_where_and_the_fixes():
    exc = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                       "memory: you tried to allocate 1152921504606846976 bytes. Error code 12\nmore")
    msg = out_of_memory_message(exc, rank=1, step=7, device="CPU", micro_batch=8, grad_accum=2,
                                activation_checkpointing="none", tp=1, pp=2)
    assert msg == ("out of memory at step 7 on rank 1 (CPU: [enforce fail at alloc_cpu.cpp:127] err == 0. "
                   "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1152921504606846976 bytes. "
                   "Error code 12); lower train.micro_batch (now 8; raise train.grad_accum, now 2, to keep the "
                   "global batch), set model.activation_checkpointing=full, or spread the model over more devices "
                   "with parallelism.tp (now 1) or parallelism.pp (now 2)")
    start = out_of_memory_message(MemoryError(), rank=0, step=None, device="GPU", micro_batch=1, grad_accum=1,
                                  activation_checkpointing="full", tp=2, pp=1)
    assert start.startswith("out of memory while starting (model, engine, data) on rank 0 (GPU: MemoryError); ")
    assert "activation_checkpointing" not in start  # already full: not advised again


@pytest.mark.usefixtures("embedded_ready")
def test_one_process_run_out_of_memory_is_not_a_failed_collective(tmp_path, monkeypatch):
    """A real one-process run whose step 2 asks the allocator for 2**60 bytes (NEOX_FAULT_OOM); the worker
    alone (what the launcher adds to a worker's error, its stderr passed on, a non-zero exit and no
    traceback, is tests/train/test_runs.py's hung-rank run)."""
    monkeypatch.setenv("NEOX_FAULT_OOM", "2")
    proc = workers([*TINY, "cluster.cpu_procs=1", "train.steps=3", f"run_dir={tmp_path / 'run'}"])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert ("neox: error (rank 0): out of memory at step 2 on rank 0 (CPU: [enforce fail at alloc_cpu.cpp"
            in proc.stderr), out[-3000:]
    assert "DefaultCPUAllocator: can't allocate memory" in proc.stderr
    assert "lower train.micro_batch (now 4; raise train.grad_accum, now 1, to keep the global batch)" in proc.stderr
    assert "collective failed" not in out and "Traceback" not in out, out[-3000:]


def _workers(pid: int) -> list:
    """The `python -m neox.train` processes below `pid`."""
    return [p for p in descendants(pid) if cmdline(p)[1:4] == ["-u", "-m", "neox.train"]
            or cmdline(p)[1:3] == ["-m", "neox.train"]]


@pytest.mark.usefixtures("embedded_ready")
def test_worker_killed_by_sigkill_is_said_to_be_likely_the_oom_killer(tmp_path):
    """The kernel's out-of-memory killer ends a rank with SIGKILL, which no Python code sees: the
    launcher says what such an end most often means (before: exit 247 and only DeepSpeed's log line).
    The run logs every 10th step, and its first step at once (the wait below depends on it)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "launch.py", *tiny("train.log_every=10"), "cluster.cpu_procs=1",
                             "train.steps=400", f"run_dir={run}"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not (run / "metrics.jsonl").exists() or '"train/loss"' not in (run / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.1)
        workers = _workers(proc.pid)
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()
    steps = list(train_losses(run))
    assert steps[0] == 1 and all(s % 10 == 0 for s in steps[1:]), steps
    assert proc.returncode == 247, out[-3000:]
    assert ("neox: a worker was killed with SIGKILL: most often by the kernel's out-of-memory killer (see `dmesg`)"
            in out), out[-3000:]
