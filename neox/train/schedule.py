"""Learning-rate schedule: linear warmup, then cosine, linear or constant decay to min_lr."""
from __future__ import annotations

import math
from typing import Callable


def lr_multiplier(warmup: int, decay_steps: int, decay: str, min_ratio: float) -> Callable[[int], float]:
    """A function of the optimizer step giving the fraction of the peak lr (for LambdaLR)."""
    def at(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, decay_steps - warmup))
        if decay == "linear":
            return 1.0 - (1.0 - min_ratio) * progress
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return at
