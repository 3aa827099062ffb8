"""Host (CPU) time per forward + backward of the small fused ops against PyTorch eager, with the GPU idle.

    python bench/host_cost.py

Tiny shapes ([8, 2048] bf16), so each call's time is what the host spends on it: Python, the autograd
nodes, allocations and kernel launches. That cost decides a step whose GPU work is smaller (the norms at
training shapes take ~0.1 ms of GPU time), and shows why the norms and bias-GeLU use C++ autograd nodes.
Best of 3 rounds of 300 calls.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from neox.kernels import bias_gelu, layer_norm, rms_norm  # noqa: E402


def host_us(step: Callable[[], None], calls: int = 300) -> float:
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench/host_cost.py needs a CUDA device")
    dt, C = torch.bfloat16, 2048
    x = torch.randn(8, C, device="cuda", dtype=dt, requires_grad=True)
    w = torch.ones(C, device="cuda", dtype=dt, requires_grad=True)
    b = torch.zeros(C, device="cuda", dtype=dt, requires_grad=True)
    g = torch.randn(8, C, device="cuda", dtype=dt)
    cases = {
        "layer_norm": (lambda: layer_norm(x, w, b, impl="fused").backward(g),
                       lambda: F.layer_norm(x, (C,), w, b).backward(g)),
        "rms_norm": (lambda: rms_norm(x, w, impl="fused").backward(g),
                     lambda: F.rms_norm(x, (C,), w).backward(g)),
        "bias_gelu": (lambda: bias_gelu(x, b, impl="fused").backward(g),
                      lambda: F.gelu(x + b).backward(g)),
    }
    print(f"# host us per forward + backward, [8, {C}] bf16, {torch.cuda.get_device_name()}\n")
    print("| op | fused us | eager us |")
    print("|---|---|---|")
    for name, (fused, eager) in cases.items():
        print(f"| {name} | {host_us(fused):.1f} | {host_us(eager):.1f} |", flush=True)


if __name__ == "__main__":
    main()
