"""fp8 against bf16 for the linear layers alone: where train.precision=fp8 gains and what it pays.

    python bench/fp8_linear.py                      # 1.4B (d 2048, ff 8192) and 6.7B (d 4096, ff 16384) layers
    python bench/fp8_linear.py --shapes 1.4B --tokens 8192
    python bench/fp8_linear.py --d 4096 --ff 16384  # one custom shape

Per linear of a block (qkv, attention out, fc_in, fc_out; --tokens rows, micro 4 x seq 2048 by default), forward +
backward (x and weight gradients) of:
  * bf16: F.linear;
  * torchao: neox.model.fp8's layer with torchao's float8 function under torch.compile, each weight cast once and
    its fp8 copy reused (what train.precision=fp8 ran before neox's kernels);
  * neox: neox.model.fp8's default layer, neox.kernels.fp8.fp8_linear (torchao's numerics, neox's cast kernels),
    weight cached the same way; "neox, weight per call": the weight cast at every call (ZeRO-3);
  * neox casts: the two activation-side casts alone (x -> e4m3 + its transpose, dy -> e5m2 + its transpose), with
    their bandwidth (6 bytes per element: the amax read, the cast's read and its two fp8 writes);
  * fp8 GEMMs: the three torch._scaled_mm calls on operands already in fp8 and in their layouts, the floor.
GPU-only medians (the host hidden behind a sleep kernel: bench/kernels.py's timing) per linear, then per layer (the
four linears back to back in one step) GPU-only and wall (host launches included: a host-bound path shows here).
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
from neox.kernels import _backend  # noqa: E402
from neox.model.fp8 import convert_to_fp8  # noqa: E402

SHAPES = {"1.4B": (2048, 8192), "6.7B": (4096, 16384)}  # d_model, d_ff
KINDS = ("bf16", "torchao", "neox", "neox_per_call", "casts", "gemms")


def gpu_ms(step, iters: int) -> tuple[float, float]:
    """(wall ms, GPU-only ms) of step()."""
    wall = _time(step, "cuda", iters, warmup=5)
    return wall, _time(step, "cuda", iters, warmup=1, hide_host_ms=2.0 + 3 * wall)


def layer_step(lin: nn.Module, x: torch.Tensor, g: torch.Tensor):
    def step():
        lin.weight.grad = x.grad = None
        lin(x).backward(g)
    return step


def casts_step(x: torch.Tensor, g: torch.Tensor):
    ext = _backend.extension("cuda")[0]
    x2, g2 = x.detach().reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])

    def step():
        ext.fp8_cast(x2, False, True, True, False)
        ext.fp8_cast(g2, True, True, True, False)
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


def fp8_layer(K: int, N: int, compiled: bool, cached: bool) -> nn.Linear:
    lin = nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
    convert_to_fp8(nn.Sequential(lin), compiled=compiled, cache_weights=cached)
    return lin


def bench_shapes(label: str, M: int, d: int, ff: int, iters: int) -> dict:
    linears = {"qkv": (3 * d, d), "attn proj": (d, d), "mlp fc_in": (ff, d), "mlp fc_out": (d, ff)}
    print(f"\n## {label} layers (d {d}, ff {ff}), {M} tokens: GPU-only ms per linear fwd+bwd\n")
    print("| linear | N x K | bf16 | torchao compiled | neox | neox, weight per call | neox casts (GB/s) | "
          "fp8 GEMMs | bf16 / torchao | bf16 / neox | neox / GEMMs |")
    print("|---" * 11 + "|", flush=True)
    rows, steps_by_kind = [], {k: [] for k in KINDS}
    total = dict.fromkeys(KINDS, 0.0)
    for name, (N, K) in linears.items():
        torch.manual_seed(0)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        steps = {"bf16": layer_step(nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16), x, g),
                 "torchao": layer_step(fp8_layer(K, N, compiled=True, cached=True), x, g),
                 "neox": layer_step(fp8_layer(K, N, compiled=False, cached=True), x, g),
                 "neox_per_call": layer_step(fp8_layer(K, N, compiled=False, cached=False), x, g),
                 "casts": casts_step(x, g), "gemms": gemms_step(M, N, K)}
        r = {"linear": name, "N": N, "K": K}
        for kind, step in steps.items():
            r[kind + "_wall"], r[kind] = gpu_ms(step, iters)
            total[kind] += r[kind]
            steps_by_kind[kind].append(step)
        r["casts_GBps"] = 6 * M * (K + N) / r["casts"] / 1e6
        rows.append(r)
        print(f"| {name} | {N} x {K} | {r['bf16']:.3f} | {r['torchao']:.3f} | {r['neox']:.3f} | "
              f"{r['neox_per_call']:.3f} | {r['casts']:.3f} ({r['casts_GBps']:.0f}) | {r['gemms']:.3f} | "
              f"{r['bf16'] / r['torchao']:.2f} | {r['bf16'] / r['neox']:.2f} | {r['neox'] / r['gemms']:.2f} |",
              flush=True)
    print(f"| sum of the four | | {total['bf16']:.3f} | {total['torchao']:.3f} | {total['neox']:.3f} | "
          f"{total['neox_per_call']:.3f} | {total['casts']:.3f} | {total['gemms']:.3f} | "
          f"{total['bf16'] / total['torchao']:.2f} | {total['bf16'] / total['neox']:.2f} | "
          f"{total['neox'] / total['gemms']:.2f} |")
    # the whole layer in one step: the host can run ahead within it, as in training
    layer = {}
    for kind in ("bf16", "torchao", "neox", "neox_per_call"):
        fns = steps_by_kind[kind]
        layer[kind + "_wall"], layer[kind] = gpu_ms(lambda fns=fns: [f() for f in fns], iters)
    print("\nPer layer (the four linears in one step), ms: GPU-only / wall\n\n| path | GPU-only | wall | "
          "bf16 / path (GPU-only) | bf16 / path (wall) |\n|---|---|---|---|---|")
    for kind in ("bf16", "torchao", "neox", "neox_per_call"):
        print(f"| {kind} | {layer[kind]:.3f} | {layer[kind + '_wall']:.3f} | {layer['bf16'] / layer[kind]:.2f} | "
              f"{layer['bf16_wall'] / layer[kind + '_wall']:.2f} |", flush=True)
    return {"shapes": label, "d": d, "ff": ff, "tokens": M, "rows": rows, "sum_gpu_only_ms": total,
            "layer_ms": layer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--shapes", default="1.4B,6.7B", help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--d", type=int, help="one custom shape instead of --shapes: d_model (with --ff)")
    ap.add_argument("--ff", type=int, help="d_ff of the custom shape")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/bench")) / "fp8_linear.json")
    args = ap.parse_args()
    print(f"# fp8 vs bf16 linear fwd+bwd, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.d or args.ff:
        shapes = {f"d {args.d}": (args.d, args.ff or 4 * args.d)}
    else:
        shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
    results = [bench_shapes(s, args.tokens, d, ff, args.iters) for s, (d, ff) in shapes.items()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "results": results}) + "\n")


if __name__ == "__main__":
    main()
