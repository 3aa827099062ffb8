"""Finding the compiled kernels and choosing, per call, between them and the PyTorch references.

The extensions are built at install time by setup.py (never here): `neox._C_cpu` always, `neox._C_cuda`
when torch has CUDA and nvcc was found. Importing them is lazy and happens once; the reason an extension
is missing is kept so that `describe()` can state it at train start. Nothing in this package imports
deepspeed or hydra: the kernels and their tests run on a bare torch install.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import warnings
from types import ModuleType
from typing import Optional

import torch

from neox.errors import KernelError

OPS = ("layer_norm", "rms_norm", "rotary", "masked_softmax", "bias_gelu", "swiglu", "cross_entropy", "linear",
       "add3", "adamw")
IMPLS = ("auto", "fused", "reference")

# Ops for which `impl="auto"` takes the compiled kernel, per device type. Chosen by measurement with
# bench/kernels.py (numbers in csrc/README.md and bench/RESULTS.md). On CPU the C++ kernels are plain
# scalar loops: they win where PyTorch eager is a chain of unfused ops (rms_norm, rotary, masked_softmax,
# swiglu: 2-7x) and lose where eager has vectorised transcendental or fused CPU kernels (layer_norm
# ~0.7-1.1x, bias_gelu's erf 0.05-0.25x, fp32 cross_entropy's exp ~0.5-1.3x), so auto keeps the
# reference for those on CPU.
# On CUDA (H200, bf16, 8192 tokens, bench/RESULTS.md 2026-11-26, session-11 section) every fused op
# does its fwd+bwd in less GPU time than eager and torch.compile: norms 1.66-1.79x eager / 1.22-1.50x
# compile, rotary 10.4x / 1.3x, masked_softmax 13.7x / 2.5x, bias_gelu 2.0x / 1.3x, swiglu 5.5x / 1.4x,
# cross_entropy 7.8x / 1.55x; timed per call with a sync, each is faster than eager as well. In the model
# (the next section there): Pythia-1.4B trains at 55,644 tok/s with every op fused against 49,321 with the
# references, and a 1.4B ALiBi model 17% faster with attention through masked_softmax than through SDPA.
# linear (neox.kernels.linear: the bias-gradient kernel, weight gradients added in the GEMM) is CUDA only under
# auto: on CPU torch's reduction is as fast and the tensor-parallel layers' bitwise equality is kept.
# add3 (the parallel residual's one-pass add: 4 passes for the reference's 6) is CUDA only under auto: on CPU
# its scalar bf16 conversions lose to torch's vectorised adds (1024 x 1024 on 2 cores: bf16 0.27 ms against 0.17,
# fp32 0.10 against 0.14); on CUDA its bench/kernels.py row is still to be run.
# adamw (neox.kernels.adamw: AdamW from bf16 gradients, 28 B per parameter against torch's ~40) is CUDA only
# under auto, where it does torch's fused AdamW arithmetic bit for bit (by construction; the GPU tests assert it);
# on CPU its scalar loop took 31 ms where torch's vectorised path (the reference) took 20 (8.4M parameters, one
# thread), so auto keeps torch's there.
AUTO_FUSED: dict[str, frozenset[str]] = {
    "cpu": frozenset({"rms_norm", "rotary", "masked_softmax", "swiglu"}),
    "cuda": frozenset(OPS),
}

_EXT_NAME = {"cpu": "neox._C_cpu", "cuda": "neox._C_cuda"}
_loaded: dict[str, tuple[Optional[ModuleType], str]] = {}
_warned: set[str] = set()

# Tests set this: every output buffer the wrappers allocate is filled with NaN first, so a kernel that
# skips an element cannot pass by reusing stale memory.
POISON_OUTPUTS = os.environ.get("NEOX_KERNELS_POISON", "0") == "1"


def _build_status() -> dict:
    path = os.path.join(os.path.dirname(__file__), "_build_status.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def extension(device_type: str) -> tuple[Optional[ModuleType], str]:
    """The compiled module for 'cpu' or 'cuda', or (None, why it is not usable here)."""
    if device_type not in _EXT_NAME:
        return None, f"no fused kernels for device type {device_type!r}"
    if device_type not in _loaded:
        name = _EXT_NAME[device_type]
        try:
            _loaded[device_type] = (importlib.import_module(name), "")
        except ImportError as e:
            entry = _build_status().get(name, {})
            if entry.get("built") is False:
                reason = f"{name} not built: {entry.get('reason', 'unknown')}"
            elif importlib.util.find_spec(name) is None:
                reason = f"{name} not built (reinstall: pip install --no-build-isolation -e .)"
            else:
                reason = f"{name} failed to import: {e}"
            _loaded[device_type] = (None, reason)
    ext, reason = _loaded[device_type]
    if ext is not None and device_type == "cuda" and not torch.cuda.is_available():
        return None, "no CUDA device visible"
    return ext, reason


def warn_once(key: str, message: str) -> None:
    """A warning that is shown once per process per key, so a fallback is said out loud but not spammed."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def choose(op: str, impl: str, device: torch.device) -> Optional[ModuleType]:
    """The compiled module that should run `op` for tensors on `device`, or None for the reference."""
    if impl not in IMPLS:
        raise KernelError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return None
    ext, reason = extension(device.type)
    if ext is None:
        if impl == "fused":
            raise KernelError(f"{op}: impl='fused' was asked for but {reason}; use impl='auto' or 'reference'")
        return None
    if impl == "auto" and op not in AUTO_FUSED.get(device.type, frozenset()):
        return None
    return ext


def check_inputs(op: str, impl: str, main: torch.Tensor, *others: Optional[torch.Tensor],
                 same_dtype: tuple[Optional[torch.Tensor], ...] = ()) -> bool:
    """Validate the inputs of a fused call; True if the fused kernel can take them.

    Wrong device or mismatched dtypes raise KernelError (the reference would not give right numbers either).
    A dtype the kernels do not cover (e.g. float64) falls back to the reference under impl='auto' with a
    one-time warning, and raises under impl='fused'.
    """
    for t in others:
        if t is not None and t.device != main.device:
            raise KernelError(f"{op}: inputs on different devices ({main.device} and {t.device})")
    for t in same_dtype:
        if t is not None and t.dtype != main.dtype:
            raise KernelError(f"{op}: dtype mismatch ({main.dtype} and {t.dtype}); cast the inputs first")
    if main.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        if impl == "fused":
            raise KernelError(f"{op}: fused kernels take float32/bfloat16/float16, got {main.dtype}")
        warn_once(f"{op}:{main.dtype}", f"neox.kernels.{op}: dtype {main.dtype} has no fused kernel; "
                                       "using the PyTorch reference")
        return False
    return True


def fused_extension(op: str, impl: str, main: torch.Tensor, *others: Optional[torch.Tensor],
                    unsupported: Optional[str] = None) -> Optional[ModuleType]:
    """The compiled module that runs `op` on these inputs, or None for the reference: `choose`, then
    `check_inputs`; an empty input, or a shape the caller found the kernel does not take (`unsupported`
    says why), falls back with a one-time warning."""
    ext = choose(op, impl, main.device)
    if ext is None or not check_inputs(op, impl, main, *others):
        return None
    why = unsupported or ("empty input" if main.numel() == 0 else None)
    if why is not None:
        unsupported_shape(op, tuple(main.shape), why, impl)
        return None
    return ext


def unsupported_shape(op: str, shape: tuple[int, ...], why: str, impl: str) -> None:
    """Announce (once per op and shape) that a shape falls back to the reference."""
    warn_once(f"{op}:{shape}", f"neox.kernels.{op}: shape {tuple(shape)} is not supported by the fused "
                               f"kernel ({why}); using the PyTorch reference (impl={impl!r})")


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a NaN-filled buffer when POISON_OUTPUTS is on (tests)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        t.fill_(float("nan"))
    return t


def as_float32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Parameters enter the kernels as contiguous fp32; autograd casts their grads back to t's dtype."""
    return None if t is None else t.float().contiguous()


class _SavedTensorKernel(torch.autograd.Function):
    """y = ext.<op>_forward(x, y, *args); dx = ext.<op>_backward(dy, saved, dx, *args), where `saved` is
    x, or y for an op whose gradient is cheaper from its output (softmax)."""

    @staticmethod
    def forward(ctx, ext, op: str, save_output: bool, out_shape: tuple, x, *args):
        y = empty(out_shape, x.dtype, x.device)
        getattr(ext, f"{op}_forward")(x, y, *args)
        ctx.save_for_backward(y if save_output else x)
        ctx.ext, ctx.op, ctx.x_shape, ctx.args = ext, op, x.shape, args
        return y

    @staticmethod
    def backward(ctx, dy):
        (saved,) = ctx.saved_tensors
        dx = empty(ctx.x_shape, saved.dtype, saved.device)
        getattr(ctx.ext, f"{ctx.op}_backward")(dy.contiguous(), saved, dx, *ctx.args)
        return (None, None, None, None, dx) + (None,) * len(ctx.args)


def apply_saved_tensor_kernel(ext: ModuleType, op: str, x: torch.Tensor, *args, out_shape: Optional[tuple] = None,
                              save_output: bool = False) -> torch.Tensor:
    """Run a compiled op that keeps one tensor for its backward (its input, or with save_output its output),
    as one autograd node; `args` (plain numbers) go to both kernels after the tensors."""
    return _SavedTensorKernel.apply(ext, op, save_output, tuple(x.shape if out_shape is None else out_shape), x,
                                    *args)
