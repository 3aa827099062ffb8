"""fp8 against bf16 for the linear layers alone: where train.precision=fp8 gains and what it pays.

    python bench/fp8_linear.py                                 # the 1.4B layers: 4 x 2048 tokens, d 2048, ff 8192
    python bench/fp8_linear.py --d 4096 --ff 16384             # the 6.7B layers

Per layer shape, forward + backward (x and weight gradients) of:
  * bf16: F.linear;
  * fp8 eager / fp8 compiled: neox.model.fp8's layer (torchao float8, tensorwise dynamic scaling), its casts as
    separate kernels or fused by torch.compile;
  * fp8 compiled, weight cached: as compiled, the weight cast once and its fp8 copy reused (what
    train.precision=fp8 runs between two optimizer steps: neox.model.fp8.Fp8Matmul);
  * fp8 GEMMs only: the three torch._scaled_mm calls on operands already in fp8 and in the layouts they need,
    the ceiling the casts stand between.
Median milliseconds over --iters with the host hidden behind a sleep kernel (the GPU's work alone, as in a
training step whose host runs ahead; bench/kernels.py's timing), TFLOP/s (6·M·N·K per fwd+bwd) and ratios
against bf16; the all-layers row also gives the wall time (host launches and compiled-call overhead in it).
Writes --out JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import _time  # noqa: E402  (bench/kernels.py: CUDA-event timing, optionally with the host hidden)
from neox.model.fp8 import convert_to_fp8  # noqa: E402


def gpu_ms(step, iters: int) -> tuple[float, float]:
    """(wall ms, GPU-only ms) of step()."""
    wall = _time(step, "cuda", iters, warmup=5)
    return wall, _time(step, "cuda", iters, warmup=1, hide_host_ms=2.0 + 3 * wall)


def layer_step(lin: nn.Module, x: torch.Tensor, g: torch.Tensor):
    def step():
        lin.weight.grad = x.grad = None
        lin(x).backward(g)
    return step


def gemms_step(M: int, N: int, K: int):
    """The fp8 GEMMs of one fwd+bwd: y = x·Wᵀ, dx = g·W, dW = gᵀ·x (first operand row-major, second
    column-major)."""
    e4, e5, one = torch.float8_e4m3fn, torch.float8_e5m2, torch.ones((), device="cuda")
    x = torch.randn(M, K, device="cuda").to(e4)
    w = torch.randn(N, K, device="cuda").to(e4)
    g = torch.randn(M, N, device="cuda").to(e5)
    w_t = w.t().contiguous()  # [K, N]: W as the column-major second operand of g·W
    g_t, x_t = g.t().contiguous(), x.t().contiguous()  # gᵀ row-major; x as the column-major second operand

    def step():
        torch._scaled_mm(x, w.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=True)
        torch._scaled_mm(g, w_t.t(), one, one, out_dtype=torch.bfloat16)
        torch._scaled_mm(g_t, x_t.t(), one, one, out_dtype=torch.bfloat16)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--ff", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/bench")) / "fp8_linear.json")
    args = ap.parse_args()
    M, d, ff = args.tokens, args.d, args.ff
    shapes = {"qkv": (3 * d, d), "attn proj": (d, d), "mlp fc_in": (ff, d), "mlp fc_out": (d, ff)}
    print(f"# fp8 vs bf16 linear fwd+bwd, {torch.cuda.get_device_name()}, torch {torch.__version__}, {M} tokens; "
          "GPU-only ms (host hidden), the last row wall ms\n")
    print("| layer | N x K | bf16 ms | fp8 eager ms | fp8 compiled ms | fp8 compiled, weight cached ms | "
          "fp8 GEMMs only ms | bf16 TFLOP/s | compiled TFLOP/s | bf16 / compiled | bf16 / cached | bf16 / GEMMs only |")
    print("|---" * 12 + "|", flush=True)
    rows, total, wall = [], {"bf16": 0.0, "eager": 0.0, "compiled": 0.0, "cached": 0.0, "gemms": 0.0}, {}
    for name, (N, K) in shapes.items():
        torch.manual_seed(0)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        base = nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        r = {"layer": name, "N": N, "K": K}
        steps = {"bf16": layer_step(base, x, g), "gemms": gemms_step(M, N, K)}
        # cached: the weight's fp8 copy made once and reused (a training step's micro-batches between updates)
        for kind, compiled, cached in (("eager", False, False), ("compiled", True, False), ("cached", True, True)):
            lin = nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
            convert_to_fp8(nn.Sequential(lin), compiled=compiled, cache_weights=cached)
            steps[kind] = layer_step(lin, x, g)
        for kind, step in steps.items():
            w, r[kind] = gpu_ms(step, args.iters)
            r[kind + "_wall"] = w
            total[kind] += r[kind]
            wall[kind] = wall.get(kind, 0.0) + w
        flops = 6 * M * N * K
        rows.append(r)
        print(f"| {name} | {N} x {K} | {r['bf16']:.3f} | {r['eager']:.3f} | {r['compiled']:.3f} | {r['cached']:.3f} | "
              f"{r['gemms']:.3f} | {flops / r['bf16'] / 1e9:.0f} | {flops / r['compiled'] / 1e9:.0f} | "
              f"{r['bf16'] / r['compiled']:.2f} | {r['bf16'] / r['cached']:.2f} | {r['bf16'] / r['gemms']:.2f} |", flush=True)
    for label, t in (("all four", total), ("all four, wall", wall)):
        print(f"| {label} | | {t['bf16']:.3f} | {t['eager']:.3f} | {t['compiled']:.3f} | {t['cached']:.3f} | "
              f"{t['gemms']:.3f} | | | {t['bf16'] / t['compiled']:.2f} | {t['bf16'] / t['cached']:.2f} | "
              f"{t['bf16'] / t['gemms']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "tokens": M, "rows": rows,
                                    "gpu_only_total_ms": total, "wall_total_ms": wall}) + "\n")


if __name__ == "__main__":
    main()
