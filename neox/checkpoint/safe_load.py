"""Loading never runs code from a checkpoint.

DeepSpeed 0.19.8's `TorchCheckpointEngine.load` calls `torch.load(weights_only=False)`, which
unpickles anything, including code. While neox loads, the engine's checkpoint engine is swapped for
one that calls `torch.load(weights_only=True)` with a short allowlist of the plain classes DeepSpeed
itself writes (an enum, a dataclass of offsets, torch.Size); a file holding anything else is refused
with one line naming the file and the class. neox's own files (random states, manifests, the run
state) are JSON or weights_only tensors.
"""
from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import Any, Iterator, List

import torch

from neox.errors import CheckpointError


def allowed_globals() -> List[Any]:
    """Classes DeepSpeed puts in its checkpoint files that the weights_only unpickler must rebuild."""
    allowed: List[Any] = [torch.Size]
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        allowed.append(fragment_address)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    return allowed


def safe_load(path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` with DeepSpeed's plain classes allowed; refuses anything else.
    With mmap, tensors stay on disk until read (for reading slices of large files)."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln or "global" in ln.lower()),
                      str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise CheckpointError(f"{path}: refusing to load: the file holds pickled objects beyond tensors and "
                              f"plain containers, which could run code ({detail[:200]})") from None
    except Exception as exc:  # noqa: BLE001 - any failure to parse is one line naming the file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: unreadable ({first[:200]})") from None


class SafeCheckpointEngine:
    """Wraps DeepSpeed's checkpoint engine: the same object, but `load` is weights_only."""

    def __init__(self, inner):
        self._inner = inner

    def load(self, path, map_location=None):
        return safe_load(path, map_location=map_location if map_location is not None else "cpu")

    def __getattr__(self, name):
        return getattr(self._inner, name)


@contextlib.contextmanager
def safe_engine_loads(engine) -> Iterator[None]:
    """For the duration, every file the engine loads through its checkpoint engine is weights_only."""
    inner = getattr(engine, "checkpoint_engine", None)
    if inner is None:
        yield
        return
    engine.checkpoint_engine = SafeCheckpointEngine(inner)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner


def check_files_safe(root: Path, rels: List[str]) -> None:
    """Open every .pt file under root with the safe loader (for tools that then call DeepSpeed's own)."""
    for rel in rels:
        if rel.endswith(".pt"):
            safe_load(root / rel)
