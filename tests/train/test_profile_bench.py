"""bench/profile_step.py: its interval arithmetic, and a 2-rank run (tp=2 over gloo) that rank 0 reports."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
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
    assert proc.stdout.count("| **wall** |") == 1  # one writer: rank 1 profiled the same steps and printed nothing
