"""AdamW straight from bf16 gradients into the fp32 optimizer state and the bf16 weights (csrc/optim/).

Why: a bf16 run keeps fp32 masters of its bf16 weights. torch's path for its step (what
neox/train/fused_step.py does today) copies each bf16 gradient into a new fp32 `.grad` (2 B read, 4 written
per parameter), runs the fused AdamW on the fp32 masters (16 read, 12 written) and copies every master
back into its bf16 weight (4 + 2): ~40 B per parameter, and 4 B per parameter of fp32 gradients alive.
`adamw_bf16_step_` reads the bf16 gradient as it is and writes the bf16 weight in the same pass: 28 B per
parameter, the least an AdamW with fp32 state can move, and no fp32 gradients at all.

The numbers are torch's: on CUDA the masters, exp_avg and exp_avg_sq equal those of torch's `_fused_adamw_`
on fp32 copies of the gradients bit for bit (csrc/optim/adamw.cu lists the arithmetic; `pytest -m gpu
tests/kernels/test_adamw.py` asserts it), and the bf16 weights are the new masters rounded to nearest even,
as `_foreach_copy_` rounds them. On CPU the kernel follows torch's CPU fused AdamW (whose arithmetic differs
from torch's CUDA kernel) within a few ulps, and impl="auto" takes torch's own path there (faster).
The step counts are kept as torch's fused AdamW keeps them (float32 tensors on the device, +1 before
the update and - found_inf after), so an optimizer's state_dict, and so a checkpoint, is the same whichever
path stepped it; `torch_adamw_state` creates missing state as torch would.

    exp_avgs, exp_avg_sqs, steps = torch_adamw_state(optimizer, masters)
    adamw_bf16_step_(params16, [p.grad for p in params16], masters, exp_avgs, exp_avg_sqs, steps,
                     lr=group["lr"], beta1=..., beta2=..., eps=..., weight_decay=..., grad_scale=None)
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch

from neox.errors import KernelError

from . import _backend as B

_F32, _BF16 = torch.float32, torch.bfloat16


def adamw_bf16_step_reference(params16: Sequence[torch.Tensor], grads16: Sequence[Optional[torch.Tensor]],
                              masters: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                              exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor], *, lr: float,
                              beta1: float, beta2: float, eps: float, weight_decay: float,
                              grad_scale: Optional[torch.Tensor] = None,
                              found_inf: Optional[torch.Tensor] = None) -> None:
    """torch's own path, as torch.optim.AdamW(fused=True) takes it: fp32 copies of the gradients (zeros for
    None), `torch._fused_adamw_` with the step counts moved as torch's `_fused_adam` moves them, then the
    bf16 weights copied from the masters (not where found_inf is non-zero: that step changes nothing)."""
    if not masters:
        return
    grads = [torch.zeros_like(m) if g is None else g.to(_F32) for g, m in zip(grads16, masters)]
    torch._foreach_add_(list(steps), 1)
    torch._fused_adamw_(list(masters), grads, list(exp_avgs), list(exp_avg_sqs), [], list(steps), amsgrad=False,
                        lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, maximize=False,
                        grad_scale=grad_scale, found_inf=found_inf)
    if found_inf is not None:
        torch._foreach_sub_(list(steps), [found_inf] * len(steps))
        if found_inf.item():  # a reference may sync; the kernel does not
            return
    torch._foreach_copy_(list(params16), list(masters))


def adamw_bf16_step_(params16: Sequence[torch.Tensor], grads16: Sequence[Optional[torch.Tensor]],
                     masters: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                     exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor], *, lr: float, beta1: float,
                     beta2: float, eps: float, weight_decay: float, grad_scale: Optional[torch.Tensor] = None,
                     found_inf: Optional[torch.Tensor] = None, impl: str = "auto") -> None:
    """One AdamW step (torch.optim.AdamW's, decoupled weight decay, no amsgrad, no maximize) of every
    tensor i, in place: masters[i], exp_avgs[i], exp_avg_sqs[i] (fp32) from grads16[i] (bf16, or None for
    a zero gradient) divided by `grad_scale`, then params16[i] (bf16) = masters[i] rounded to nearest even.
    steps[i] (0-dim float32, torch's fused-AdamW step count) goes up by 1 - found_inf. Where found_inf
    (0-dim float32 on the device, 0 or 1) is 1, no tensor changes and no host sync happens.
    On CUDA the whole list is a handful of launches (40 tensors each) that never wait for the host.
    """
    grads16 = _check(params16, grads16, masters, exp_avgs, exp_avg_sqs, steps, grad_scale, found_inf,
                     (lr, beta1, beta2, eps, weight_decay))
    if not masters:
        return
    ext = B.choose("adamw", impl, masters[0].device)
    hyper = dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                 weight_decay=float(weight_decay))
    if ext is None:
        adamw_bf16_step_reference(params16, grads16, masters, exp_avgs, exp_avg_sqs, steps, **hyper,
                                  grad_scale=grad_scale, found_inf=found_inf)
        return
    steps = list(steps)
    torch._foreach_add_(steps, 1)
    ext.adamw_bf16_step(list(params16), list(grads16), list(masters), list(exp_avgs), list(exp_avg_sqs), steps,
                        hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["weight_decay"], hyper["eps"],
                        grad_scale, found_inf)
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))


def torch_adamw_state(optimizer: torch.optim.Optimizer, masters: Sequence[torch.Tensor]
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """exp_avgs, exp_avg_sqs, steps of `masters` in a torch.optim.Adam/AdamW's state; state missing for a
    master is created as torch's fused AdamW creates it (float32 step on the master's device, zero moments),
    so that the state_dict is the same whichever path steps it."""
    exp_avgs, exp_avg_sqs, steps = [], [], []
    for m in masters:
        state = optimizer.state[m]
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=_F32, device=m.device)
            state["exp_avg"] = torch.zeros_like(m, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(m, memory_format=torch.preserve_format)
        if "max_exp_avg_sq" in state:
            raise KernelError("adamw: amsgrad state found; adamw_bf16_step_ has no amsgrad (use torch's AdamW)")
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        steps.append(state["step"])
    return exp_avgs, exp_avg_sqs, steps


def _check(params16, grads16, masters, exp_avgs, exp_avg_sqs, steps, grad_scale, found_inf, numbers_
           ) -> list[Optional[torch.Tensor]]:
    """One-line KernelError for input the kernel (or torch's own path) would get wrong (~1.4 us a tensor);
    returns the gradients, a strided one as a contiguous copy (it is only read: no reason to refuse it)."""
    lists = dict(params16=params16, grads16=grads16, masters=masters, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                 steps=steps)
    lengths = {name: len(v) for name, v in lists.items()}
    if len(set(lengths.values())) > 1:
        raise KernelError(f"adamw: the tensor lists differ in length ({lengths}); pass one entry per parameter")
    if not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in numbers_):
        raise KernelError("adamw: lr, betas, eps and weight_decay must be plain numbers (a tensor lr is not "
                          "supported)")
    if not masters:
        return []
    device = masters[0].device
    for i, (w, g, p, m, v, s) in enumerate(zip(params16, grads16, masters, exp_avgs, exp_avg_sqs, steps)):
        if not (p.dtype == m.dtype == v.dtype == s.dtype == _F32 and w.dtype == _BF16
                and (g is None or g.dtype == _BF16)):
            raise KernelError(f"adamw: tensor {i} has dtypes params16 {w.dtype}, grads16 "
                              f"{None if g is None else g.dtype}, masters {p.dtype}, exp_avgs {m.dtype}, exp_avg_sqs "
                              f"{v.dtype}, steps {s.dtype}; expected bfloat16, bfloat16, then float32")
        if not (w.device == p.device == m.device == v.device == s.device == device
                and (g is None or g.device == device)):
            raise KernelError(f"adamw: tensor {i} is not all on {device} (the step count included); move it")
        shape = p.shape
        if not (w.shape == m.shape == v.shape == shape and (g is None or g.shape == shape) and s.numel() == 1):
            raise KernelError(f"adamw: tensor {i} has shapes params16 {tuple(w.shape)}, grads16 "
                              f"{None if g is None else tuple(g.shape)}, masters {tuple(shape)}, exp_avgs "
                              f"{tuple(m.shape)}, exp_avg_sqs {tuple(v.shape)}, steps {tuple(s.shape)}; "
                              "all but steps (one value) must match")
        if not (w.is_contiguous() and p.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
            raise KernelError(f"adamw: tensor {i} is not contiguous (params16, masters and the state are written in "
                              "place); pass contiguous tensors")
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and (t.dtype != _F32 or t.numel() != 1 or t.device != device):
            raise KernelError(f"adamw: {name} must be one float32 value on {device}, got {t.dtype} "
                              f"{tuple(t.shape)} on {t.device}")
    return [g if g is None or g.is_contiguous() else g.contiguous() for g in grads16]
