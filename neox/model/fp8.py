"""fp8 training (`train.precision=fp8`): the linear layers' matmuls in fp8, everything else in bf16.

The matmuls follow torchao's float8 training (`torchao.float8`, tensorwise dynamic scaling: each
operand is scaled by its own amax at every call, e4m3 forward and e5m2 for the output gradient). Eager, they
run on neox's cast kernels (`neox.kernels.fp8.fp8_linear`: torchao's numerics bit for bit, two launches per cast,
no compiled function's host cost); inside a `train.compile` block torchao's own function is traced, so that
inductor fuses its casts into the block's graph.
Its module swap only knows `nn.Linear`, so conversion here swaps the *class* of each chosen layer
for a subclass whose matmul is torchao's float8 one: `nn.Linear`, and any layer whose one matmul is a
method `local_linear(x, bias=None)` (the tensor-parallel `ColumnParallelLinear`/`RowParallelLinear` of
neox.parallel.tensor, which this package sits below and does not import). Parameters, state_dict
keys and the TP communication are untouched: an fp8 run saves what a bf16 run saves (export, consolidation
and init_from read it as such).
Each TP rank scales its own shard; a row-parallel layer's partial sums are dequantized before the
all-reduce, so a shard's scale never leaks into another's. In training each weight is cast once per
optimizer step and its fp8 copy shared by every call until the trainer clears it (`Fp8Matmul`).

Kept in bf16: the output head (the logits feed the loss directly; torchao's float8 example leaves
the last layer out) and any layer whose local weight has a dim that is not a multiple of 16 (fp8 GEMMs
need it). Apply after `apply_tensor_parallel` (it builds plain TP layers from what it finds).
"""
from __future__ import annotations

import functools
import logging
import types
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from neox.errors import ConfigError
from neox.kernels import _backend as kernels_backend
from neox.kernels import fp8 as fp8_kernels
from neox.model.gpt import Head

MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (8.9), Hopper (9.0) and newer
REQUIREMENT = "train.precision=fp8 needs an NVIDIA GPU with fp8 matmuls (compute capability 8.9 or newer: Ada, Hopper)"


def check_device(device: torch.device) -> None:
    """Raise ConfigError unless `device` runs fp8 matmuls (make_plan cannot see the GPU from a login node)."""
    if device.type != "cuda":
        raise ConfigError(f"{REQUIREMENT}; this worker runs on {device.type}: use train.precision=bf16 or fp32")
    if torch.version.hip is None:
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_CAPABILITY:
            raise ConfigError(f"{REQUIREMENT}; {torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}: "
                              "use train.precision=bf16")


def _fp8_linear(self: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ self.weight.T (+ bias) with the matmul (and its two backward matmuls) in fp8."""
    return self.fp8_matmul(x, self.weight, bias)


class FP8Linear(nn.Linear):
    """nn.Linear with an fp8 matmul; `matmul` is the output before the bias (gpt.linear_before_bias)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fp8_linear(self, x, self.bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return _fp8_linear(self, x)


@functools.lru_cache(maxsize=None)
def _fp8_subclass(cls: type) -> type:
    """`cls` with its `local_linear` in fp8 (one class per layer class, so isinstance, deepcopy and the TP
    communication of `cls` stay as they are)."""
    return type(f"FP8{cls.__name__}", (cls,), {"local_linear": _fp8_linear, "__doc__": cls.__doc__})


def _fp8_class(module: nn.Module) -> Optional[type]:
    """The fp8 class for `module`, or None: not a linear layer, or already fp8."""
    cls = type(module)
    if cls is nn.Linear:
        return FP8Linear
    local = getattr(cls, "local_linear", None)
    return _fp8_subclass(cls) if callable(local) and local is not _fp8_linear else None


def _torchao() -> types.SimpleNamespace:
    """torchao's float8 pieces this module uses; a ConfigError naming the fix without torchao."""
    # torchao 0.18's import makes noise no user can act on: a deprecation note torch logs, and on Python 3.12 a
    # SyntaxWarning from one of its docstrings (seen once per rank on the GPU machine)
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training
            from torchao.float8.config import ScalingGranularity
            from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
            from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
            from torchao.float8.float8_training_tensor import GemmInputRole
    except ImportError as exc:
        raise ConfigError(f"train.precision=fp8 needs torchao's float8 training ({exc}); "
                          "pip install torchao==0.18.*, or use train.precision=bf16") from exc
    finally:
        pytree_log.setLevel(level)
    return types.SimpleNamespace(Float8LinearConfig=Float8LinearConfig, convert_to_float8_training=convert_to_float8_training,
                                 ScalingGranularity=ScalingGranularity, GemmInputRole=GemmInputRole,
                                 matmul_with_hp_or_float8_args=matmul_with_hp_or_float8_args,
                                 hp_tensor_to_float8_dynamic=hp_tensor_to_float8_dynamic)


class _SharedFp8Weight(torch.autograd.Function):
    """The fp8 copy of weight_t made earlier in this optimizer step, as this call's operand: torchao's matmul
    sees an operand already in fp8 and casts nothing; the weight gradient passes through to weight_t unchanged
    (as torchao's own cast does)."""

    @staticmethod
    def forward(ctx, weight_t: torch.Tensor, fp8_copy: torch.Tensor) -> torch.Tensor:
        c = fp8_copy  # a new wrapper of the same fp8 bytes and scale: autograd gives each call's output its own node
        return type(c)(c._data, c._scale, c._orig_dtype, c._linear_mm_config, c._gemm_input_role, c._axiswise_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class Fp8Matmul:
    """matmul(x, weight) = x @ weight.T in fp8 with torchao's float8 numerics (its configs as torchao builds them
    for its own Float8Linear; converting a throwaway meta-device layer through the public entry point also applies
    torchao's inductor workaround for compiled fp8 casts).

    By default an eager call runs `neox.kernels.fp8.fp8_linear` (neox's cast kernels and torch._scaled_mm: torchao's
    results bit for bit at a fraction of its host and GPU cost); a call Dynamo traces (a `train.compile` block), and
    a call the kernels do not take (not bf16, a token count that is not a multiple of 16, no compiled extension for
    the device), runs torchao's autograd function, which gives the same numbers.
    emulate: torchao's emulation (fp8 casts, high-precision matmuls; CPU tests), for every call.
    compiled: torchao's function under torch.compile for every eager call (inductor fuses each operand's amax,
    scale and cast; what fp8 ran before neox's kernels, kept for the bench's comparison).

    cache_weights: a weight changes only at the optimizer step, yet torchao casts it at every call: in each
    micro-batch's forward, again for the backward's input-gradient matmul, and once more in a checkpointed
    block's recompute. With the cache each weight is cast once, and every call until `clear()` uses that copy
    (Transformer Engine's `is_first_microbatch` does the same); the results are bitwise those of casting at
    every call. The trainer clears it after each step's last backward (the copies, 1 byte per weight, are gone
    before the optimizer step's memory peak). A weight whose storage or version changed is cast again even
    without `clear()`. Only for tensorwise scaling, where the forward's and the backward's weight casts are one.
    """

    def __init__(self, emulate: bool = False, compiled: bool = False, cache_weights: bool = False):
        ao = self._ao = _torchao()
        probe = ao.convert_to_float8_training(nn.Linear(16, 16, bias=False, device="meta"),
                                              config=ao.Float8LinearConfig(emulate=emulate))
        mm_config, config = self._mm_config, self._config = probe.linear_mm_config, probe.config

        def matmul(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
            return ao.matmul_with_hp_or_float8_args.apply(x, weight_t, mm_config, config)

        self._matmul = torch.compile(matmul) if compiled else matmul
        self.neox_kernels = not (emulate or compiled)
        weight_cast = config.cast_config_weight
        self.cache_weights = (cache_weights and weight_cast == config.cast_config_weight_for_grad_input
                              and weight_cast.scaling_granularity is ao.ScalingGranularity.TENSORWISE)
        self._copies: Dict[int, Tuple[torch.Tensor, Tuple[int, int], torch.Tensor]] = {}  # id -> weight, key, copy
        self._torchao_casts = 0
        self._neox_copies = fp8_kernels.Fp8Weights()  # the neox path's weight copies (cache_weights)

    @property
    def casts(self) -> int:
        """Weight casts made for the cache, on either path (tests read it)."""
        return self._torchao_casts + self._neox_copies.casts

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x @ weight.T + bias: on neox's path the bias is added in the GEMM's epilogue (before the output's one
        rounding; its gradient by neox's column-sum kernel), on torchao's to the rounded output (as its
        Float8Linear does)."""
        if (self.neox_kernels and not torch.compiler.is_compiling() and x.dtype is torch.bfloat16
                and weight.dtype is torch.bfloat16 and (x.numel() // x.shape[-1]) % 16 == 0 and x.numel()
                and kernels_backend.extension(x.device.type)[0] is not None):
            weight_fp8 = self._neox_copies.get(weight) if self.cache_weights else None
            return fp8_kernels.fp8_linear(x, weight, weight_fp8, bias)
        weight_t = weight.t()
        if self.cache_weights:
            weight_t = _SharedFp8Weight.apply(weight_t, self._fp8_copy(weight))
        y = self._matmul(x, weight_t)
        return y if bias is None else y + bias.to(y.dtype)

    def _fp8_copy(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version)
        held = self._copies.get(id(weight))
        if held is None or held[0] is not weight or held[1] != key:  # the same tensor (not a dead one's id), unchanged
            ao, cast = self._ao, self._config.cast_config_weight
            with torch.no_grad():
                copy = ao.hp_tensor_to_float8_dynamic(weight.t(), cast.target_dtype, self._mm_config,
                                                      gemm_input_role=ao.GemmInputRole.WEIGHT,
                                                      round_scales_to_power_of_2=self._config.round_scales_to_power_of_2)
            held = self._copies[id(weight)] = (weight, key, copy)
            self._torchao_casts += 1
        return held[2]

    def clear(self) -> None:
        """Forget every fp8 weight copy: the weights are about to change (the optimizer step)."""
        self._copies.clear()
        self._neox_copies.clear()


def convert_to_fp8(model: nn.Module, emulate: bool = False, compiled: bool = False,
                   cache_weights: bool = False) -> Dict[str, List[str]]:
    """Swap the model's linear layers (plain or TP-sharded) for fp8 ones, in place.

    emulate: fp8 casts with the matmul in high precision (torchao's emulation; runs on CPU).
    compiled: torchao's casts and GEMM under torch.compile for eager calls (the bench's comparison); neither:
    neox's fp8 kernels (what training uses: see `Fp8Matmul`).
    cache_weights: one fp8 copy of each weight per optimizer step (`Fp8Matmul`; `fp8_matmul(model).clear()`).
    Returns {"fp8": [names converted], "bf16": ["name (why)" kept in bf16]}.
    """
    matmul = Fp8Matmul(emulate, compiled, cache_weights)
    heads = {id(m.proj) for m in model.modules() if isinstance(m, Head)}
    done: Dict[str, List[str]] = {"fp8": [], "bf16": []}
    for name, module in model.named_modules():
        fp8_cls = _fp8_class(module)
        if fp8_cls is None:
            continue
        out_dim, in_dim = module.weight.shape
        if id(module) in heads:
            done["bf16"].append(f"{name} (output head)")
        elif out_dim % 16 or in_dim % 16:
            done["bf16"].append(f"{name} (weight {out_dim}x{in_dim}: fp8 matmuls need multiples of 16)")
        else:
            module.__class__ = fp8_cls
            module.fp8_matmul = matmul
            done["fp8"].append(name)
    return done


def fp8_matmul(model: nn.Module) -> Optional[Fp8Matmul]:
    """The matmul (and weight cache) the model's fp8 layers share; None if none is fp8."""
    return next((m.fp8_matmul for m in model.modules() if isinstance(getattr(m, "fp8_matmul", None), Fp8Matmul)),
                None)


def caches_weights(zero_stage: int, compiled_blocks: bool) -> bool:
    """Whether a run keeps one fp8 copy of each weight per step (`Fp8Matmul`). Not under ZeRO-3 (the weights it
    gathers are not the parameters' own storage) nor with train.compile (Dynamo would trace the cache lookup
    inside each compiled block and guard on its state: a recompile per step until its limit, then eager)."""
    return zero_stage < 3 and not compiled_blocks


def apply_fp8(model: nn.Module, device: torch.device, cache_weights: bool = True) -> str:
    """The trainer's entry: check the GPU, convert, and say in one line what runs in fp8. The trainer clears
    `fp8_matmul(model)` before each optimizer step (`caches_weights` says when to cache at all)."""
    check_device(device)
    # neox's cast kernels and torch._scaled_mm (neox.kernels.fp8); torchao's casts compiled where they are not built
    compiled = kernels_backend.extension(device.type)[0] is None
    done = convert_to_fp8(model, compiled=compiled, cache_weights=cache_weights)
    if not done["fp8"]:
        raise ConfigError("train.precision=fp8: no linear layer has dims that are multiples of 16; "
                          "use train.precision=bf16")
    kept = done["bf16"][:3] + ([f"{len(done['bf16']) - 3} more"] if len(done["bf16"]) > 3 else [])
    kept = f"; kept in bf16: {', '.join(kept)}" if kept else ""
    cached = ", each weight cast once per optimizer step" if fp8_matmul(model).cache_weights else ""
    casts = ("torchao's casts compiled, the first steps include compile time" if compiled
             else "neox's cast kernels")
    return (f"fp8: {len(done['fp8'])} linear layers' matmuls in fp8 (torchao's tensorwise dynamic scaling; "
            f"{casts}{cached}){kept}")
