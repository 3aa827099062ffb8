"""Every random state a rank owns, as tensors and plain numbers (so `torch.load(weights_only=True)`
reads it back: no numpy arrays, no pickled classes).

Tensor-parallel dropout (`neox.parallel.random.TPRandom`) derives its per-rank stream from the
default CPU generator and keeps no state of its own, so the default generators cover it. Any
component that does keep a random state registers it with `register(name, get, set)`; `get` must
return tensors, numbers, strings, lists, tuples or dicts of those.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Dict, Tuple

import numpy as np
import torch

_EXTRA: Dict[str, Tuple[Callable[[], Any], Callable[[Any], None]]] = {}


def register(name: str, get: Callable[[], Any], set: Callable[[Any], None]) -> None:  # noqa: A002
    """Add a random state to every checkpoint (e.g. a Megatron-style tracker). Idempotent per name."""
    _EXTRA[name] = (get, set)


def rng_state() -> Dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    extra = {name: get() for name, (get, _) in _EXTRA.items()}
    if extra:
        state["extra"] = extra
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # a different number of local devices: restore this rank's own device
            torch.cuda.set_rng_state(cuda[min(torch.cuda.current_device(), len(cuda) - 1)])
    for name, value in state.get("extra", {}).items():
        if name in _EXTRA:
            _EXTRA[name][1](value)
