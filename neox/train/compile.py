"""`train.compile=true`: regional compilation, one `torch.compile` per transformer block.

Compiling block by block (not the whole model) keeps compile time to one block's graph reused by every
layer, works the same for a plain model, a tensor-parallel one and pipeline stages, and leaves the
module tree, parameter names and checkpoints unchanged (`nn.Module.compile` compiles in place; wrapping
in `torch.compile(module)` would rename every parameter under `_orig_mod.`).

A block that cannot compile (a missing C++ compiler for the CPU backend, an op Dynamo rejects) runs
eager: the first failure is reported once, naming the block type and the cause, and the run goes on.
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Union

import torch
import torch.nn as nn


def compile_blocks(model: nn.Module, block_type: type, say: Callable[[str], None],
                   backend: Union[str, Callable] = "inductor") -> int:
    """Compile every `block_type` module of `model` in place; returns how many were compiled."""
    blocks: List[nn.Module] = [m for m in model.modules() if isinstance(m, block_type)]
    reported: set = set()  # shared by all blocks: a failure is said once for the whole model
    for block in blocks:
        block.forward = _eager_on_failure(torch.compile(block.forward, backend=backend), block.forward,
                                          block_type.__name__, say, reported)
    if blocks:
        # neox's fused C++/CUDA kernels are opaque to Dynamo: it compiles the code between them (a
        # graph break around each) and warns once per kernel; this line says it once instead.
        warnings.filterwarnings("ignore", message=".*Dynamo does not know how to trace the builtin")
        say(f"train.compile: {len(blocks)} {block_type.__name__} modules compiled with torch.compile "
            "(regional; the first steps include compile time; fused kernels run between compiled regions)")
    return len(blocks)


def _eager_on_failure(compiled: Callable, eager: Callable, what: str, say: Callable[[str], None],
                      reported: set) -> Callable:
    """Call `compiled`; if compiling fails, say so once and use `eager` from then on (for this block)."""
    state = {"fn": compiled}

    def forward(*args, **kwargs):
        if state["fn"] is eager:
            return eager(*args, **kwargs)
        try:
            return state["fn"](*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - Dynamo/Inductor raise many types: all mean "not compiled"
            if not _is_compile_failure(exc):
                raise
            state["fn"] = eager
            if what not in reported:
                reported.add(what)
                inner = getattr(exc, "inner_exception", None) or exc.__cause__ or exc  # the compiler's own error
                cause = (str(inner).strip().splitlines() or [""])[0][:200]
                say(f"warning: train.compile: {what} could not be compiled ({type(inner).__name__}: {cause}); "
                    "it runs eager")
            return eager(*args, **kwargs)

    return forward


def _is_compile_failure(exc: Exception) -> bool:
    """Errors raised by the compiler stack itself, as opposed to the model's own (shape errors, OOM)."""
    module = type(exc).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "torch._subclasses")) or "BackendCompilerFailed" in type(exc).__name__
