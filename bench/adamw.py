"""The bf16 optimizer step: torch's path (as neox/train/fused_step.py takes it) against neox.kernels.adamw_bf16_step_.

    python bench/adamw.py                              # GPU: Pythia-1.4B's parameter list (292 tensors, 1.41B)
    python bench/adamw.py --grad-scale 0.5             # with a clip factor (torch divides in its kernel, so do we)
    python bench/adamw.py --device cpu --layers 2 --d-model 64 --vocab 512 --iters 2   # the smoke test's size

Contenders, each on its own copy of the same state (one AdamW group, lr 1e-4, betas (0.9, 0.95), wd 0.1):
- torch (fused_step): per chunk of fused_step.CHUNK_ELEMENTS, fp32 `.grad`s copied from the bf16 gradients,
  torch.optim.AdamW(fused=True).step, then `_foreach_copy_` of the masters into the bf16 weights: ~40 B/param;
- torch fused AdamW alone: the same AdamW step with the fp32 gradients already there (what torch's kernel
  costs by itself; 28 B/param plus no copies);
- neox adamw_bf16_step_: one pass from the bf16 gradients (28 B/param).
First one step of each from the same state, compared bit for bit (masters, exp_avg, exp_avg_sq, steps, bf16
weights; "bitwise" column); then the median of --iters steps, timed with CUDA events twice: as called (the
host's launches and Python inside, the GPU idle meanwhile: "wall ms") and behind a sleep kernel that hides the
host ("GPU ms"). GB/s: the bytes each contender must move, over its GPU time, also as a share of a device
copy's bandwidth. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import _time, copy_bandwidth  # noqa: E402  (bench/kernels.py: CUDA-event timing, copy GB/s)
from neox.kernels.adamw import adamw_bf16_step_, torch_adamw_state  # noqa: E402
from neox.train.fused_step import CHUNK_ELEMENTS, chunks  # noqa: E402

LR, BETAS, EPS, WD = 1e-4, (0.9, 0.95), 1e-8, 0.1


def pythia_shapes(layers: int, d: int, vocab: int) -> list[tuple[int, ...]]:
    """GPT-NeoX's parameter tensors: per layer qkv + bias, dense + bias, two layernorms (w, b), fc_in + bias,
    fc_out + bias; the embedding, the final norm and the untied head."""
    per_layer = [(3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return [(vocab, d)] + per_layer * layers + [(d,), (d,), (vocab, d)]


class State:
    """bf16 weights, fp32 masters and a torch AdamW over them (its state is what both paths step)."""

    def __init__(self, w16: list[torch.Tensor]):
        self.w16 = [w.clone() for w in w16]
        self.masters = [w.float() for w in w16]
        self.opt = torch.optim.AdamW(self.masters, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
        self.state = torch_adamw_state(self.opt, self.masters)  # torch would create the same at its first step


def torch_step(s: State, g16: list[torch.Tensor], scale: torch.Tensor | None) -> None:
    """fused_step's chunked path: fp32 grads per chunk, torch's fused AdamW, the copy back."""
    s.opt.grad_scale = scale
    for part in chunks([m.numel() for m in s.masters], CHUNK_ELEMENTS):
        masters, params = [s.masters[i] for i in part], [s.w16[i] for i in part]
        for m in masters:
            m.grad = torch.empty_like(m)
        torch._foreach_copy_([m.grad for m in masters], [g16[i] for i in part])
        try:
            torch.optim.AdamW.step(s.opt)
        finally:
            for m in masters:
                m.grad = None
        torch._foreach_copy_(params, masters)


def adamw_alone(s: State, g32: list[torch.Tensor], scale: torch.Tensor | None) -> None:
    s.opt.grad_scale = scale
    for m, g in zip(s.masters, g32):
        m.grad = g
    torch.optim.AdamW.step(s.opt)


def neox_step(s: State, g16: list[torch.Tensor], scale: torch.Tensor | None) -> None:
    adamw_bf16_step_(s.w16, g16, s.masters, *s.state, lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                     weight_decay=WD, grad_scale=scale)


def bitwise_equal(a: State, b: State) -> bool:
    tensors = lambda s: s.w16 + s.masters + [t for lst in s.state for t in lst]  # noqa: E731
    return all(torch.equal(x.view(torch.int16 if x.dtype == torch.bfloat16 else torch.int32),
                           y.view(torch.int16 if y.dtype == torch.bfloat16 else torch.int32))
               if x.dim() else torch.equal(x, y) for x, y in zip(tensors(a), tensors(b)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--grad-scale", type=float, default=None, help="the clip factor fused_step would pass")
    ap.add_argument("--hide-host-ms", type=float, default=50.0, help="sleep kernel before each GPU-time step")
    args = ap.parse_args(argv)
    dev = args.device
    torch.manual_seed(0)
    shapes = pythia_shapes(args.layers, args.d_model, args.vocab)
    n = sum(torch.Size(s).numel() for s in shapes)
    w16 = [(torch.randn(s, device=dev) * 0.02).bfloat16() for s in shapes]
    g16 = [(torch.randn(s, device=dev) * 1e-3).bfloat16() for s in shapes]
    scale = None if args.grad_scale is None else torch.tensor(args.grad_scale, device=dev)
    bw = copy_bandwidth(dev)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"# bf16 optimizer step: {len(shapes)} tensors, {n:,} parameters, {name}, torch {torch.__version__}, "
          f"grad_scale {args.grad_scale}, copy bandwidth {bw:.0f} GB/s")

    ref, ours = State(w16), State(w16)
    torch_step(ref, g16, scale)
    neox_step(ours, g16, scale)
    same = "yes" if bitwise_equal(ref, ours) else "NO"
    g32 = [g.float() for g in g16]
    rows = [("torch (fused_step: fp32 grads + fused AdamW + copy back)", 40, lambda: torch_step(ref, g16, scale),
             "reference"),
            ("torch fused AdamW alone (fp32 grads ready)", 28, lambda: adamw_alone(ref, g32, scale), ""),
            ("neox adamw_bf16_step_", 28, lambda: neox_step(ours, g16, scale), same)]
    print("\n| path | wall ms | GPU ms | B/param | GB/s (% copy) | x torch (GPU) | bitwise after 1 step |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for label, per_param, step, eq in rows:
        wall = _time(step, dev, args.iters, warmup=1)
        gpu = _time(step, dev, args.iters, warmup=1, hide_host_ms=args.hide_host_ms) if dev == "cuda" and args.hide_host_ms \
            else wall
        base = base or gpu
        gbs = per_param * n / gpu / 1e6
        print(f"| {label} | {wall:.3f} | {gpu:.3f} | {per_param} | {gbs:.0f} ({100 * gbs / bw:.0f}%) | "
              f"{base / gpu:.2f} | {eq} |", flush=True)


if __name__ == "__main__":
    main()
