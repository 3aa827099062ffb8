"""Benchmark neox's fused kernels against PyTorch eager, torch.compile of the same reference code, and Liger.

    python bench/kernels.py                      # GPU: 8192 tokens, hidden 2048 and 4096, vocab 50304
    python bench/kernels.py --hidden 2048        # the 1.4B shape only (4 x 2048 tokens, d 2048, vocab 50304)
    python bench/kernels.py --device cpu --tokens 1024 --hidden 1024 --no-compile   # decides AUTO_FUSED on CPU

Each op runs forward + backward on bf16 inputs (fp32 on CPU by default: --dtype). Reported: median time
over --iters runs, the fused kernel's achieved bandwidth (the bytes an ideal fused fwd+bwd must move,
over its time) as a share of measured device copy bandwidth, the speed-up against eager and compiled,
and for cross-entropy the peak extra memory of each contender. On a GPU each contender is timed twice:
as a step the host must first launch (wall, the GPU idles meanwhile), and with the host hidden behind a
sleep kernel (GPU-only: its work alone, as in a training step where the host runs ahead). Goals (issues #6, #16):
>= 1.5x eager, >= 1.0x torch.compile and >= 1.0x Liger, fused CE peak memory <= 1/2 of eager's. Prints a markdown
table as it goes.

Liger (liger-kernel, Triton; GPU only, imported only when it runs) is called the way its nn modules call it
(`liger_kernel.ops.Liger*Function.apply`, their defaults: RMSNorm in place, casting "llama"), each op on the
inputs in its own layout: rotary rotates q and k in place (the q and k heads of neox's qkv buffer, as two
contiguous [b, s, h, hd] tensors, as separate projections give them) with duplicated cos/sin tables, SwiGLU
and GeGLU take gate and up as two tensors. Rows neox has no kernel for (GeGLU) show Liger against eager and
compile alone; "linear + cross_entropy" is neox's path (the matmul, then its fused CE from the bf16 logits)
against Liger's fused linear cross-entropy, which never materializes the logits.
"""
from __future__ import annotations

import argparse
import functools
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))
from neox import kernels as K  # noqa: E402


@dataclass
class Case:
    op: str
    shape: str
    inputs: list[torch.Tensor]  # grads are taken w.r.t. the floating ones that require grad
    fn: Callable[..., object]  # fn(*inputs, impl=...) -> tensor or tuple
    bytes_moved: int  # what an ideal fused forward + backward reads and writes (0: matmul-bound, not shown)
    neox: bool = True  # False: neox has no kernel for it (Liger's alone, against eager and compile)
    # liger(liger_kernel.ops, inputs) -> (Liger's inputs in its own layout, fn(*those) -> tensor or tuple)
    liger: Optional[Callable[..., tuple[list[torch.Tensor], Callable[..., object]]]] = None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(step: Callable[[], None], device: str, iters: int, warmup: int = 3, hide_host_ms: float = 0.0) -> float:
    """Median milliseconds of step(), between CUDA events around it.

    With hide_host_ms, a sleep kernel of that length runs first on the stream, so the host has queued the
    whole step before the GPU reaches it: the time is the GPU's work alone, as inside a training step whose
    host runs ahead of the GPU. Without it, launches and Python are in the time as well (the GPU idles
    while the host catches up), as for a step that waits on the host."""
    for _ in range(warmup):
        step()
    _sync(device)
    cycles = int(hide_host_ms * _sleep_cycles_per_ms()) if hide_host_ms and device == "cuda" else 0
    times = []
    for _ in range(iters):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if cycles:
                torch.cuda._sleep(cycles)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def _sleep_cycles_per_ms() -> float:
    """How many `torch.cuda._sleep` cycles make a millisecond on this GPU (measured once)."""
    n = 2_000_000
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(n)  # warm
    a.record()
    torch.cuda._sleep(n)
    b.record()
    b.synchronize()
    return n / a.elapsed_time(b)


def copy_bandwidth(device: str) -> float:
    """GB/s of a large device-to-device copy (read + write)."""
    n = (1 << 28) if device == "cuda" else (1 << 25)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _time(lambda: dst.copy_(src), device, iters=20)
    return 2 * n / ms / 1e6


def _fwd_bwd(inputs: list[torch.Tensor], call: Callable[..., object]) -> Callable[[], None]:
    """One forward + backward of call(*inputs); output gradients drawn at the first call (per contender: Liger's
    outputs may have another layout). The input gradients are returned (autograd.grad), not accumulated into
    .grad, as in a model, where they flow into the op before: an op that computes its input gradient in place
    in the output gradient (neox's rotary, Liger's rotary and RMSNorm) would otherwise pay a copy into .grad
    that training never makes (the bench holds the output gradient, so autograd cannot take it over)."""
    leaves = [t for t in inputs if t.requires_grad]
    grads: list[torch.Tensor] = []

    def step() -> None:
        out = call(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        if not grads:
            grads.extend(torch.randn_like(o) for o in outs)
        torch.autograd.grad(outs, leaves, grads)

    return step


def load_liger(device: str) -> tuple[Optional[object], str]:
    """(liger_kernel.ops, a line for the header), or (None, why not): Liger's kernels are Triton, GPU only."""
    if device != "cuda":
        return None, "liger-kernel: GPU only (Triton), not run on CPU"
    logging.getLogger("liger_kernel").setLevel(logging.ERROR)  # its discovery of DSLs not installed here
    try:
        import importlib.metadata

        import liger_kernel.ops as ops
    except ImportError as e:
        return None, f"liger-kernel not importable ({e}); pip install liger-kernel==0.8.5 to add its column"
    return ops, f"liger-kernel {importlib.metadata.version('liger-kernel')} (liger_kernel.ops, Triton)"


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().clone().requires_grad_(t.requires_grad)


def _liger_rope(L, inputs: list[torch.Tensor]):
    """q and k = the q and k heads of the qkv buffer [b, s, h, 3, hd] as [b, s, h, hd] tensors of their own, passed
    as [b, h, s, hd] views (as in HF); cos/sin duplicated to the rotary width ([1, s, rot]), in qkv's dtype."""
    qkv, cos, sin = inputs
    q, k = _leaf(qkv[:, :, :, 0]), _leaf(qkv[:, :, :, 1])
    c, s = (torch.cat((t, t), dim=-1)[None].to(qkv.dtype) for t in (cos, sin))
    return [q, k, c, s], lambda q, k, c, s: L.LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), c, s)


def _liger_pairs(fn_name: str):
    """SwiGLU/GeGLU for Liger: gate and up as two [T, f] tensors (its MLPs' layout); ours are (gate, up) pairs."""
    def make(L, inputs: list[torch.Tensor]):
        x = inputs[0]
        gate, up = (_leaf(x[..., i::2]) for i in (0, 1))
        return [gate, up], getattr(L, fn_name).apply
    return make


def _parallel_residual(x, w1, b1, w2, b2, a, m, impl: str) -> tuple[torch.Tensor, ...]:
    """(x + a + m, layer_norm(x; w1, b1), layer_norm(x; w2, b2)), as Block.forward's parallel residual has them."""
    x, y1, y2 = K.dual_norm(x, w1, b1, w2, b2, 1e-5, impl=impl)
    return K.add3(x, a, m, impl=impl), y1, y2


def make_cases(device: str, dtype: torch.dtype, tokens: int, hidden: int, vocab: Optional[int]) -> list[Case]:
    T, H, e = tokens, hidden, torch.tensor([], dtype=dtype).element_size()

    def t(*shape, grad=True, scale=1.0, dt=dtype):
        return (torch.randn(*shape, device=device) * scale).to(dt).requires_grad_(grad)

    hd = 128 if H % 128 == 0 else H
    heads = H // hd
    seq = min(T, 2048)
    batch = max(1, T // seq)
    f = 256 * ((8 * H // 3 + 255) // 256)  # SwiGLU width, Llama-style
    def rotary(dims: int) -> tuple[list[torch.Tensor], Callable]:
        """The q and k heads of an MHA qkv buffer [b, s, h, 3, hd]: neox's op rotates them in place (the
        reference, eager or compiled, returns a new buffer)."""
        return ([t(batch, seq, heads, 3, hd), t(seq, dims // 2, grad=False, dt=torch.float32),
                 t(seq, dims // 2, grad=False, dt=torch.float32)],
                lambda qkv, c, s, impl, version=0: K.rotary_qkv_(qkv, c, s, dims, impl=impl, version=version))

    quarter = hd // 4  # Pythia's rotary_pct 0.25
    cases = [
        Case("layer_norm", f"[{T}, {H}]", [t(T, H), t(H), t(H)], lambda x, w, b, impl: K.layer_norm(x, w, b, 1e-5, impl=impl),
             5 * T * H * e, liger=lambda L, i: (i, lambda x, w, b: L.LigerLayerNormFunction.apply(x, w, b, 1e-5))),
        Case("layer_norm+residual", f"[{T}, {H}]", [t(T, H), t(H), t(H), t(T, H)],
             lambda x, w, b, r, impl: K.layer_norm(x, w, b, 1e-5, residual=r, impl=impl), 8 * T * H * e),
        Case("rms_norm", f"[{T}, {H}]", [t(T, H), t(H)], lambda x, w, impl: K.rms_norm(x, w, 1e-5, impl=impl), 5 * T * H * e,
             liger=lambda L, i: (i, lambda x, w: L.LigerRMSNormFunction.apply(x, w, 1e-5, 0.0, "llama", True, None))),
        # q and k of qkv [b, s, h, 3, hd], rotated in place: fwd and bwd each read and write the rotated channels
        # the parallel residual (Pythia): both norms of x and out = x + attn + mlp (a, m: the branches' outputs);
        # x's grad is the sum of out's and the two norms' (reference: two norm nodes, two adds either way;
        # fused: dual_norm, whose backward sums inside the norm backwards, and add3). Ideal bytes: forward reads
        # x, a, m and writes y1, y2, out; backward reads dy1, dy2, dout, x and writes dx (da = dm = dout).
        Case("parallel residual (2 norms + add)", f"[{T}, {H}]", [t(T, H), t(H), t(H), t(H), t(H), t(T, H), t(T, H)],
             _parallel_residual, 11 * T * H * e),
        Case("rotary (full, neox)", f"q, k of [{batch}, {seq}, {heads}, 3, {hd}]", *rotary(hd), 8 * T * H * e,
             liger=_liger_rope),
        Case("rotary (25%, neox)", f"q, k of [{batch}, {seq}, {heads}, 3, {hd}] rot {quarter}", *rotary(quarter),
             8 * T * heads * quarter * e, liger=_liger_rope),
        # the attention's q, k, v out of qkv (rotated 25% in place); the backward gathers dq, dk, dv into dqkv and
        # rotates back: autograd's split backward (a cat) + the inverse rotation, or neox's one kernel
        Case("qkv split backward (+ rotary 25%)", f"[{batch}, {seq}, {heads}, 3, {hd}] rot {quarter}",
             rotary(quarter)[0], lambda qkv, c, s, impl: K.split_qkv(qkv, c, s, quarter, impl=impl),
             6 * T * H * e + 4 * T * heads * quarter * e),
        Case("masked_softmax", f"[{batch}, {heads}, {seq}, {seq}]", [t(batch, heads, seq, seq)],
             lambda x, impl: K.masked_softmax(x, 0.088, impl=impl), 4 * batch * heads * seq * seq * e),
        Case("bias_gelu", f"[{T}, {4 * H}]", [t(T, 4 * H), t(4 * H)], lambda x, b, impl: K.bias_gelu(x, b, impl=impl),
             5 * T * 4 * H * e),
        # SwiGLU/GeGLU over x [T, 2f]: fwd reads 2f, writes f; bwd reads dy (f) and x (2f), writes dx (2f): 8 T f e
        Case("swiglu", f"[{T}, {2 * f}]", [t(T, 2 * f)], lambda x, impl: K.swiglu(x, impl=impl), 8 * T * f * e,
             liger=_liger_pairs("LigerSiLUMulFunction")),
        Case("geglu (no neox kernel)", f"[{T}, {2 * f}]", [t(T, 2 * f)],
             lambda x, impl: F.gelu(x[..., 0::2], approximate="tanh") * x[..., 1::2], 8 * T * f * e, neox=False,
             liger=_liger_pairs("LigerGELUMulFunction")),
    ]
    if vocab:
        tg = torch.randint(0, vocab, (T,), device=device)
        cases.append(Case("cross_entropy", f"[{T}, {vocab}]", [t(T, vocab, scale=2.0), tg],
                          lambda x, y, impl: K.cross_entropy(x, y, impl=impl), 2 * T * vocab * e,
                          liger=lambda L, i: (i, lambda x, y: L.LigerCrossEntropyFunction.apply(x, y, None)[0])))
        # the head and the loss: neox has no fused linear + CE (its path: the matmul, then the fused CE)
        cases.append(Case("linear + cross_entropy", f"[{T}, {H}] x [{vocab}, {H}]",
                          [t(T, H), t(vocab, H, scale=H ** -0.5), tg],
                          lambda x, w, y, impl: K.cross_entropy(F.linear(x, w), y, impl=impl), 0,
                          liger=lambda L, i: (i, lambda x, w, y:
                                              L.LigerFusedLinearCrossEntropyFunction.apply(x, w, y)[0])))
    return cases


CONTENDERS = ("eager", "compile", "fused", "liger")


def _sdpa_grads(qkv: torch.Tensor) -> list[torch.Tensor]:
    """dq, dk, dv of qkv [b, s, h, 3, hd] as a real SDPA backward delivers them (the model's views and transposes)."""
    leaf = qkv.detach().clone().requires_grad_()
    parts = [leaf[:, :, :, i] for i in range(3)]
    seen: list = [None, None, None]
    for i, t in enumerate(parts):
        t.register_hook(lambda gr, i=i: seen.__setitem__(i, gr))
    y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in parts), is_causal=True)
    torch.autograd.backward(y, torch.randn_like(y))
    return [gr if gr.stride(-1) == 1 else gr.contiguous() for gr in seen]


def bench_split_versions(dtype: torch.dtype, tokens: int, hidden: int, iters: int, bw: float,
                         device: str = "cuda") -> tuple[str, list[str]]:
    """(shape, rows of a table): the CUDA split_qkv_backward kernels alone, v4 and v5 forced through the binding's
    version, on the 1.4B attention's shape (qkv [b, s, h, 3, hd], rotary 25%), per layout of dq, dk, dv. GPU-only
    time of 10 back-to-back calls / 10; bytes = the grads read + dqkv written."""
    from neox.kernels import _backend
    ext = _backend.extension(device)[0]
    hd = 128 if hidden % 128 == 0 else hidden
    heads, seq = hidden // hd, min(tokens, 2048)
    batch, rot = max(1, tokens // seq), hd // 4
    qkv = torch.randn(batch, seq, heads, 3, hd, device=device).to(dtype)
    c, s = (torch.randn(seq, rot // 2, device=device) for _ in range(2))
    dqkv = torch.empty_like(qkv)
    contiguous = [torch.randn(batch, seq, heads, 1, hd, device=device).to(dtype)] + [
        torch.randn(batch, seq, heads, hd, device=device).to(dtype) for _ in range(2)]
    bhsd = [torch.randn(batch, heads, seq, hd, device=device).to(dtype).transpose(1, 2) for _ in range(3)]
    bhsd[0] = bhsd[0].unsqueeze(3)
    sdpa = _sdpa_grads(qkv)
    sdpa[0] = sdpa[0].unsqueeze(3)
    moved = 2 * qkv.numel() * qkv.element_size()
    rows = []
    for name, grads in (("contiguous [b, s, h, d]", contiguous), ("[b, h, s, d]", bhsd), ("SDPA's own", sdpa)):
        ms = {}
        for version in (4, 5):
            if ext.split_qkv_backward(*grads, dqkv, c, s, rot, False, version) != version:  # (-1: v5 refused)
                raise RuntimeError(f"split_qkv_backward v{version} does not take the {name} layout")

            def step(version=version, grads=grads):
                for _ in range(10):
                    ext.split_qkv_backward(*grads, dqkv, c, s, rot, False, version)
            wall = _time(step, device, iters)
            ms[version] = _time(step, device, iters, hide_host_ms=2.0 + 3 * wall) / 10
        gbs = {v: moved / t / 1e6 for v, t in ms.items()}
        strides = "; ".join(str(tuple(g.stride())) for g in grads)
        rows.append(f"| {name} | {strides} | {ms[4] * 1e3:.1f} | {ms[5] * 1e3:.1f} | {gbs[4]:.0f} ({100 * gbs[4] / bw:.0f}%) | "
                    f"{gbs[5]:.0f} ({100 * gbs[5] / bw:.0f}%) | {ms[4] / ms[5]:.2f} |")
    return f"[{batch}, {seq}, {heads}, 3, {hd}] rot {rot}", rows


def bench_rotary_versions(dtype: torch.dtype, tokens: int, hidden: int, iters: int, bw: float, liger: Optional[object],
                          device: str = "cuda") -> list[str]:
    """Rows of a table: rotary_qkv_'s CUDA kernels forced side by side (version=3, 6, 7: csrc/rotary/rotary.cu), fwd + bwd
    through autograd as the "rotary" rows time neox's, and Liger's rope on the same q and k; GPU-only ms, median of
    max(iters, 50) (these are ~0.04-0.15 ms)."""
    rows = []
    for case in make_cases(device, dtype, tokens, hidden, None):
        if not case.op.startswith("rotary ("):
            continue
        ms = {}
        contenders = [(f"v{v}", case.inputs, functools.partial(case.fn, impl="fused", version=v)) for v in (3, 6, 7)]
        if liger is not None:
            contenders.append(("liger", *case.liger(liger, case.inputs)))
        for name, inputs, call in contenders:
            step = _fwd_bwd(inputs, call)
            step()
            wall = _time(step, device, max(iters, 50))
            ms[name] = _time(step, device, max(iters, 50), hide_host_ms=2.0 + 3 * wall)
        li = ms.get("liger", float("nan"))
        gbs = case.bytes_moved / ms["v6"] / 1e6
        rows.append(f"| {case.op} | {case.shape} | {ms['v3']:.4f} | {ms['v6']:.4f} | {ms['v7']:.4f} | {li:.4f} | "
                    f"{li / ms['v3']:.2f} | {li / ms['v6']:.2f} | {li / ms['v7']:.2f} | {gbs:.0f} ({100 * gbs / bw:.0f}%) |")
    return rows


def bench_case(case: Case, device: str, iters: int, use_compile: bool, liger: Optional[object] = None) -> dict:
    res = {}
    ref = case.fn
    contenders: list[tuple[str, list[torch.Tensor], Callable]] = [
        ("eager", case.inputs, functools.partial(ref, impl="reference"))]
    if use_compile:
        torch._dynamo.reset()  # each case compiles afresh: no recompile limit carried across cases
        contenders.append(("compile", case.inputs, torch.compile(lambda *a: ref(*a, impl="reference"))))
    if case.neox:
        contenders.append(("fused", case.inputs, functools.partial(ref, impl="fused")))
    if liger is not None and case.liger is not None:
        try:
            contenders.append(("liger", *case.liger(liger, case.inputs)))
        except Exception as e:  # an API that moved: a row note
            res["liger"], res["liger_err"] = float("nan"), f"{type(e).__name__}: {str(e)[:120]}"
    for name, inputs, call in contenders:
        step = _fwd_bwd(inputs, call)
        t0 = time.time()
        try:
            step()  # compiles / warms up
        except Exception as e:  # keep the table going: one broken contender is a row note, not a crash
            res[name] = float("nan")
            res[name + "_err"] = f"{type(e).__name__}: {str(e)[:120]}"
            continue
        res[name + "_warm_s"] = time.time() - t0
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        if device == "cuda":
            step()
            torch.cuda.synchronize()
            res[name + "_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        res[name] = _time(step, device, iters)
        if device == "cuda":  # the GPU's work alone: hide the host behind a sleep longer than it
            res[name + "_gpu"] = _time(step, device, iters, hide_host_ms=2.0 + 3 * res[name])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--ops", nargs="*", default=None, help="only ops whose name starts with one of these")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (e.g. on CPU)")
    ap.add_argument("--rotary-versions", action="store_true",
                    help="also time rotary_qkv_'s CUDA kernels v3, v6, v7 side by side against Liger (GPU)")
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    bw = copy_bandwidth(args.device)
    print(f"# neox kernels: fwd+bwd, {dev_name}, torch {torch.__version__}, {dtype}, copy bandwidth {bw:.0f} GB/s")
    liger, liger_note = load_liger(args.device)
    print(f"# {K.describe('fused', args.device)}")
    print(f"# {liger_note}\n")
    gpu = args.device == "cuda"
    # "fused" is neox's kernel; ratios are other / fused (> 1: neox faster); "nan": that contender did not run
    print("| op | shape | eager ms | compile ms | fused ms | liger ms | x eager | x compile | x liger | "
          + ("GPU-only ms eager/compile/fused/liger | GPU-only x eager | GPU-only x compile | GPU-only x liger | "
             if gpu else "")
          + "fused GB/s (% copy) | peak MB eager/compile/fused/liger | goals |")
    print("|---" * (16 if gpu else 12) + "|", flush=True)
    nan = float("nan")
    for i, hidden in enumerate(args.hidden):
        for case in make_cases(args.device, dtype, args.tokens, hidden, args.vocab if i == 0 else None):
            if args.ops and not any(case.op.startswith(o) for o in args.ops):
                continue
            if not case.neox and (liger is None or case.liger is None):
                continue  # nothing of ours and no Liger: no row
            r = bench_case(case, args.device, args.iters, not args.no_compile, liger)
            e, c, f, li = (r.get(k, nan) for k in CONTENDERS)
            ge, gc, gf, gl = (r.get(k + "_gpu", nan) for k in CONTENDERS)
            # neox's kernel is the subject of the ratios; a row without one (GeGLU) is Liger's against the others
            subject, gsubject = (f, gf) if case.neox else (li, gl)
            # bandwidth of the GPU's own work where measured (the kernels' speed), else of the wall time
            gbs = case.bytes_moved / (gsubject if gpu else subject) / 1e6
            bandwidth = f"{gbs:.0f} ({100 * gbs / bw:.0f}%)" if case.bytes_moved else "- (matmul-bound)"
            peak = "/".join(f"{r.get(k + '_peak_mb', nan):.0f}" for k in CONTENDERS)

            memory_ok = (r.get("fused_peak_mb", float("inf")) <= 0.5 * r.get("eager_peak_mb", 0.0)
                         if case.op == "cross_entropy" and gpu else True)

            def verdict(e, c, f, li):
                return ("met" if e / f >= 1.5 and (c != c or c / f >= 1.0) and (li != li or li / f >= 1.0) and memory_ok
                        else "MISSED")

            goals = (f"wall {verdict(e, c, f, li)}" + (f", GPU-only {verdict(ge, gc, gf, gl)}" if gpu else "")
                     if case.neox else "no neox kernel: liger's time is the subject of the ratios")
            errs = "; ".join(f"{k}: {v}" for k, v in r.items() if k.endswith("_err"))
            x = subject
            ratios = f"{e / x:.2f} | {c / x:.2f} | {li / x:.2f}"
            gpu_cols = (f"{ge:.3f}/{gc:.3f}/{gf:.3f}/{gl:.3f} | {ge / gsubject:.2f} | {gc / gsubject:.2f} | "
                        f"{gl / gsubject:.2f} | " if gpu else "")
            print(f"| {case.op} | {case.shape} | {e:.3f} | {c:.3f} | {f:.3f} | {li:.3f} | {ratios} | {gpu_cols}"
                  f"{bandwidth} | {peak} | {goals}{' ' + errs if errs else ''} |", flush=True)
            del case
            if args.device == "cuda":
                torch.cuda.empty_cache()
    name = "qkv split backward kernels (v4 vs v5)"
    if not args.ops or any(name.startswith(o) for o in args.ops):
        if not gpu:
            print(f"\n# {name}: CUDA only (the CPU has one kernel)")
        else:
            shape, rows = bench_split_versions(dtype, args.tokens, args.hidden[0], args.iters, bw)
            print(f"\n## {name}, {shape}, {dtype}, GPU-only us per call\n")
            print("| dq, dk, dv layout | strides | v4 us | v5 us | v4 GB/s (% copy) | v5 GB/s (% copy) | v4 / v5 |")
            print("|---" * 7 + "|")
            print("\n".join(rows), flush=True)
    if args.rotary_versions and gpu:
        print(f"\n## rotary_qkv_ kernels (v3, v6, v7), fwd + bwd, {dtype}, GPU-only ms (goal >= 1.0x Liger, aim 1.15x)\n")
        print("| op | shape | v3 ms | v6 ms | v7 ms | liger ms | v3 x liger | v6 x liger | v7 x liger | v6 GB/s (% copy) |")
        print("|---" * 10 + "|")
        for hidden in args.hidden:
            print("\n".join(bench_rotary_versions(dtype, args.tokens, hidden, args.iters, bw, liger)), flush=True)
    elif args.rotary_versions:
        print("\n# --rotary-versions: CUDA only (the CPU has one kernel)")


if __name__ == "__main__":
    main()
