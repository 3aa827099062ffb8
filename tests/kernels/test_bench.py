"""bench/kernels.py runs end to end (tiny CPU shapes, no torch.compile), so the GPU benchmark cannot rot."""
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_runs_on_cpu():
    out = subprocess.run([sys.executable, os.path.join(REPO, "bench", "kernels.py"), "--device", "cpu", "--tokens", "64",
                          "--hidden", "128", "--vocab", "300", "--iters", "1", "--no-compile"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "eager ms" not in line]
    # 8 ops + the residual LayerNorm, the 25% rotary, the qkv split and the parallel residual's norms + add;
    # GeGLU (Liger's alone) has no row on CPU
    assert len(rows) == 12, out.stdout
    assert all("nan" not in r.split("|")[5] for r in rows), out.stdout  # every fused contender ran


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_bench_times_split_qkv_versions_on_cuda():
    """The v4-vs-v5 table of the qkv split backward: one row per layout of dq, dk, dv, both versions timed."""
    out = subprocess.run([sys.executable, os.path.join(REPO, "bench", "kernels.py"), "--tokens", "512", "--hidden", "256",
                          "--iters", "2", "--no-compile", "--ops", "qkv split backward kernels"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "v4 us" not in line
            and "eager ms" not in line]
    assert len(rows) == 3 and all("nan" not in r for r in rows), out.stdout
