"""Time neox's CUDA bias-GeLU and SwiGLU kernels per version (NEOX_ACT_VERSION) against Liger, in one process.

    python bench/activations.py                         # the bench/kernels.py shapes: 8192 tokens, hidden 2048, 4096
    python bench/activations.py --versions 1 3 4 5 --iters 50 --hidden 2048

Versions (csrc/activations/activations.cu): 1 = the kernels before v3 (SwiGLU v1, bias_gelu v2), 3, 4 (the default,
what `auto` runs), 5 (4 with other loads in flight: compare its fwd and bwd columns with 4's). Per op, shape and version, GPU-only milliseconds (the host hidden behind a sleep kernel, as in
bench/kernels.py's GPU-only column), median of --iters:
  - fwd+bwd: through autograd, as bench/kernels.py times it (since the native-bias change, a bias in x's dtype goes
    to the kernels as it is: no cast launches, for every version);
  - fwd, bwd: the extension's kernels called directly (bwd: bias_gelu's includes the dbias column sum);
  - fwd cold, bwd cold: each after a 256 MB read (untimed) that evicts the 50 MB L2 with clean lines, so no input is
    left in L2 by the kernel before. v4 walks the backward from the end to catch what the kernel before it left there:
    in this bench the forward (x's tail), and the next forward then starts where that backward ended (x's head), gains
    a training step does not have (there, other layers run in between; the GEMM that wrote dy just before the backward
    is the one L2 neighbour a step has). The cold columns are the kernels' speed without any of that.
Bytes an ideal kernel moves (bf16, e = 2): bias_gelu fwd reads x, writes y (2 T C e); bwd reads dy, x, writes dx
(3 T C e). SwiGLU over x [T, 2f]: fwd reads 2f, writes f (3 T f e); bwd reads dy (f) and x (2f), writes dx (2f): 5 T f e;
fwd+bwd 8 T f e (bench/kernels.py counted 6 T f e before this file).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import _fwd_bwd, _liger_pairs, _sleep_cycles_per_ms, copy_bandwidth, load_liger  # noqa: E402
from neox import kernels as K  # noqa: E402
from neox.kernels import _backend  # noqa: E402


def gpu_ms(step: Callable[[], None], iters: int, before: Optional[Callable[[], None]] = None) -> float:
    """Median GPU-only ms of step(): a sleep kernel first lets the host queue everything; `before` (untimed) runs
    between the sleep and the start event."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = torch.cuda.Event(enable_timing=True)
    t1 = torch.cuda.Event(enable_timing=True)
    t0.record()
    step()
    t1.record()
    t1.synchronize()
    cycles = int((2.0 + 3 * t0.elapsed_time(t1)) * _sleep_cycles_per_ms())
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)
        if before is not None:
            before()
        a.record()
        step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def cases(tokens: int, hidden: int, dtype: torch.dtype):
    """(op, shape text, inputs, fwd+bwd fn(impl), fwd kernel step, bwd kernel step, bytes fwd, bytes bwd, liger)."""
    ext = _backend.extension("cuda")[0]
    e = torch.tensor([], dtype=dtype).element_size()
    T, C = tokens, 4 * hidden
    x = torch.randn(T, C, device="cuda").to(dtype).requires_grad_()
    b = torch.randn(C, device="cuda").to(dtype).requires_grad_()
    bd, y, dy, dx = b.detach(), torch.empty_like(x), torch.randn_like(x), torch.empty_like(x)
    dbias = torch.empty_like(bd)  # the bias in x's dtype, as the model's (no casts on CUDA)
    xd = x.detach()
    yield ("bias_gelu", f"[{T}, {C}]", [x, b], lambda x, b, impl: K.bias_gelu(x, b, impl=impl),
           lambda: ext.bias_gelu_forward(xd, bd, y, False), lambda: ext.bias_gelu_backward(dy, xd, bd, dx, dbias, False),
           2 * T * C * e, 3 * T * C * e, None)
    del x, b, y, dy, dx, xd
    f = 256 * ((8 * hidden // 3 + 255) // 256)  # as bench/kernels.py: Llama-style width
    x = torch.randn(T, 2 * f, device="cuda").to(dtype).requires_grad_()
    xd, y, dx = x.detach(), torch.empty(T, f, device="cuda", dtype=dtype), torch.empty_like(x)
    dy = torch.randn_like(y)
    yield ("swiglu", f"[{T}, {2 * f}]", [x], lambda x, impl: K.swiglu(x, impl=impl),
           lambda: ext.swiglu_forward(xd, y), lambda: ext.swiglu_backward(dy, xd, dx),
           3 * T * f * e, 5 * T * f * e, _liger_pairs("LigerSiLUMulFunction"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--versions", nargs="+", default=["1", "3", "4", "5"])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/activations.py: CUDA only (the versions are the CUDA kernels')")
        return
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    bw = copy_bandwidth("cuda")
    liger, note = load_liger("cuda")
    print(f"# activation kernels per version: {torch.cuda.get_device_name()}, {dtype}, copy bandwidth {bw:.0f} GB/s")
    print(f"# {note}\n")
    print("| op | shape | version | fwd+bwd ms | fwd ms | bwd ms | fwd cold ms | bwd cold ms | fwd+bwd GB/s (% copy) | "
          "fwd % copy | bwd % copy | fwd cold % copy | bwd cold % copy | x liger (fwd+bwd) |")
    print("|---" * 14 + "|", flush=True)
    flush = torch.ones(64 << 20, device="cuda")  # 256 MB, read (not written: no dirty lines to write back later)
    saved = os.environ.get("NEOX_ACT_VERSION")
    try:
        for hidden in args.hidden:
            for op, shape, inputs, fn, fwd, bwd, bf, bb, lig in cases(args.tokens, hidden, dtype):
                li = float("nan")
                if liger is not None and lig is not None:
                    l_inputs, l_call = lig(liger, inputs)
                    li = gpu_ms(_fwd_bwd(l_inputs, l_call), args.iters)
                    print(f"| {op} | {shape} | liger | {li:.4f} | | | | | {(bf + bb) / li / 1e6:.0f} "
                          f"({100 * (bf + bb) / li / 1e6 / bw:.0f}%) | | | | | 1.00 |", flush=True)
                for v in args.versions:
                    os.environ["NEOX_ACT_VERSION"] = v
                    both = gpu_ms(_fwd_bwd(inputs, lambda *a: fn(*a, impl="fused")), args.iters)
                    tf, tb = gpu_ms(fwd, args.iters), gpu_ms(bwd, args.iters)
                    fc = gpu_ms(fwd, args.iters, before=lambda: flush.sum())
                    tc = gpu_ms(bwd, args.iters, before=lambda: flush.sum())

                    def pct(nbytes: float, ms: float) -> str:
                        return f"{100 * nbytes / ms / 1e6 / bw:.0f}%"

                    print(f"| {op} | {shape} | v{v} | {both:.4f} | {tf:.4f} | {tb:.4f} | {fc:.4f} | {tc:.4f} | "
                          f"{(bf + bb) / both / 1e6:.0f} ({pct(bf + bb, both)}) | {pct(bf, tf)} | {pct(bb, tb)} | "
                          f"{pct(bf, fc)} | {pct(bb, tc)} | {li / both:.3f} |", flush=True)
                torch.cuda.empty_cache()
    finally:
        if saved is None:
            os.environ.pop("NEOX_ACT_VERSION", None)
        else:
            os.environ["NEOX_ACT_VERSION"] = saved


if __name__ == "__main__":
    main()
