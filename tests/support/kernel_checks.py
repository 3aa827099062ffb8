"""Helpers shared by the kernel tests: relative error, rotary angles, the autograd graph's node names."""
from __future__ import annotations

import torch

# max |fused - reference| / max |reference| allowed per dtype (the fused op in dtype, the reference in fp32)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (at least 1e-6 below), in float64 on the CPU."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def rotary_angles(s: int, rd: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [s, rd // 2] of the usual rotary frequencies (base 10000)."""
    inv = 1.0 / (10000 ** (torch.arange(0, rd, 2).float() / rd))
    f = torch.outer(torch.arange(s).float(), inv)
    return f.cos(), f.sin()


def graph_names(t: torch.Tensor) -> list[str]:
    """The class names of every autograd node reachable from t's grad_fn."""
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        stack.extend(n for n, _ in fn.next_functions)
    return names
