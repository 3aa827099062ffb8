"""bench/profile_step.py: its interval arithmetic, and a 2-rank run (tp=2 over gloo) that rank 0 reports."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from support.procs import no_shm_leak

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "profile_step.py"


def _bench():
    spec = importlib.util.spec_from_file_location("profile_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exposed_communication_is_what_no_compute_kernel_covers():
    bench = _bench()
    compute = [(0.0, 1.0), (1.5, 2.0), (0.2, 0.4)]  # overlapping compute on two streams
    assert bench.busy_time(compute) == pytest.approx(1.5)
    assert bench.exposed_time([(0.5, 1.8)], compute) == pytest.approx(0.5)  # 1.0-1.5 only
    assert bench.exposed_time([(0.1, 0.9)], compute) == 0.0
    assert bench.exposed_time([(2.5, 3.0), (2.8, 3.2)], compute) == pytest.approx(0.7)


def _op(name, parent=None, kernels=(), us=0.0):
    """A profiler CPU event as the bench reads it (name, parent, launched kernels, host time)."""
    return types.SimpleNamespace(name=name, cpu_parent=parent, time_range=types.SimpleNamespace(elapsed_us=lambda: us),
                                 kernels=[types.SimpleNamespace(name=n, duration=d) for n, d in kernels])


def test_copies_are_given_by_the_op_that_launched_them_and_syncs_by_where_they_waited():
    bench = _bench()
    node = _op("autograd::engine::evaluate_function: CatBackward0", _op("phase: backward"))
    copy = _op("aten::copy_", _op("aten::clone", _op("aten::contiguous", node)),
               kernels=[("elementwise_kernel copy", 30.0), ("nvjet_gemm", 99.0)])
    cast = _op("cudaLaunchKernel", _op("aten::copy_", _op("aten::_to_copy", _op("aten::to", _op("phase: forward")))),
               kernels=[("elementwise_kernel copy", 10.0)])  # a kernel hung on its launch call, not the op
    item = _op("aten::_local_scalar_dense", _op("aten::item", _op("phase: engine step")))
    sync = _op("cudaStreamSynchronize", item, us=500.0)
    launch = _op("cudaLaunchKernel", copy, us=5.0)
    by = bench.kernels_by_caller([node, copy, cast, item, sync, launch], lambda n: bench.category(n) == "copies/casts")
    assert by == {"backward: CatBackward0 / aten::copy_ < aten::clone": pytest.approx(30e-6),
                  "forward / aten::copy_ < aten::_to_copy": pytest.approx(10e-6)}
    assert bench.host_syncs([copy, item, sync, launch]) == {
        "engine step / aten::_local_scalar_dense < aten::item": (1, pytest.approx(500e-6))}


@pytest.mark.slow
def test_two_ranks_profile_and_rank_0_writes_the_table(tmp_path):
    with no_shm_leak("profile_step --gpus 2"):
        proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny", "--micro", "2", "--accum", "2",
                               "--warmup", "1", "--steps", "1", "--gpus", "2", "--set", "parallelism=tp2",
                               "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = (tmp_path / "profile.md").read_text()
    assert "tiny, micro 2 x accum 2, 2 x CPU (rank 0), overrides: parallelism=tp2" in table, table
    assert "| **wall** |" in table and "Communication not overlapped by any compute kernel" in table
    assert "Host waits for the GPU per step: " in table
    assert proc.stdout.count("| **wall** |") == 1  # one writer: rank 1 profiled the same steps and printed nothing
