"""A C++ check of the kernel extensions raises a Python RuntimeError; it does not end the process.

On the H200 machine (session 19) a `TORCH_CHECK` thrown by neox._C_cuda killed the process (SIGSEGV) where the
CPU extension raises cleanly: the GPU variant runs in a subprocess, so that the crash fails this test only.
Open: the GPU test fails until the cause is found (every user-reachable input is validated in Python first)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

PROBE = """
import torch
from neox.kernels import _backend
ext = _backend.extension({device!r})[0]
x = torch.zeros(1, 3, 2, 3, 8, device={device!r})
g = [x[:, :, :, :1].clone(), x[:, :, :, 1].clone(), x[:, :, :, 2].clone()]
try:
    ext.split_qkv_backward(*g, torch.empty_like(x), None, None, 0, False, 7)
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0])
"""


def _probe(device: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE.format(device=device)], capture_output=True, text=True,
                          timeout=120)


def test_a_cpu_extension_check_raises():
    proc = _probe("cpu")
    assert proc.returncode == 0 and "raised: split_qkv: version must be 0" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_a_cuda_extension_check_raises():
    proc = _probe("cuda")
    assert proc.returncode == 0 and "raised: split_qkv: version must be 0" in proc.stdout, \
        f"exit {proc.returncode}: {proc.stderr[-2000:]}"
