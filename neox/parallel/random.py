"""Random streams for tensor parallelism.

Two kinds of dropout exist under TP:
* outside TP regions (residual dropout, embedding dropout) every TP rank holds the same tensor,
  so the masks must be identical: the default generators, seeded the same on all TP ranks;
* inside TP regions (attention probabilities of this rank's heads; under sequence parallelism
  the residual stream of this rank's tokens) each rank holds different elements, so the masks
  must differ, or TP would correlate dropout across heads/tokens.

`TPRandom.fork()` runs a region on a per-rank stream *derived from the default CPU generator*:
on entry it draws one number from the default CPU generator (advancing it identically on every
TP rank), seeds the device generator with a mix of that number and the tp rank, and restores the
device generator on exit. The design choice: the forked stream carries no state of its own.
`torch.utils.checkpoint` (non-reentrant, as the model uses) saves and restores the default CPU
and device generators around recomputation, so the same draws replay the same masks, without
a Megatron-style tracker that checkpointing would have to know about. Saving and loading the
random state for a checkpoint is therefore just the default generators (`neox.checkpoint.rng`).
"""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import torch

_MIX_A = 0x9E3779B97F4A7C15  # golden-ratio and splitmix64 constants: decorrelate nearby seeds
_MIX_B = 0xBF58476D1CE4E5B9
_TP_OFFSET = 2718


def _derive_seed(drawn: int, tp_rank: int) -> int:
    z = (drawn * _MIX_A + (tp_rank + _TP_OFFSET) * _MIX_B) % (1 << 64)
    z ^= z >> 31
    return z % (1 << 63)


def _device_generator(device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None
                                             else torch.cuda.current_device()]
    raise NotImplementedError(f"no default generator known for device {device}")


class TPRandom:
    """Forks the random stream per tensor-parallel rank for the duration of a region."""

    def __init__(self, tp_rank: int):
        self.tp_rank = tp_rank

    @contextlib.contextmanager
    def fork(self, device: torch.device) -> Iterator[None]:
        drawn = int(torch.randint(0, 1 << 62, (1,), dtype=torch.int64).item())  # CPU: no sync
        gen = _device_generator(device)
        saved = gen.get_state()
        gen.manual_seed(_derive_seed(drawn, self.tp_rank))
        try:
            yield
        finally:
            gen.set_state(saved)


class TPDropout(torch.nn.Dropout):
    """Dropout whose mask differs across TP ranks (for activations sharded across them)."""

    def __init__(self, p: float, rng: TPRandom):
        super().__init__(p)
        self.rng = rng

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        with self.rng.fork(x.device):
            return super().forward(x)


def seed_all(seed: int, pp_rank: int = 0) -> None:
    """Seed python and torch identically on all TP and DP ranks of a pipeline stage.

    Different stages get different streams (they hold different layers, so identical streams
    would correlate their masks). TP ranks must share the seed: see the module docstring.
    """
    s = seed + 100 * pp_rank
    random.seed(s)
    torch.manual_seed(s)  # CPU and every CUDA device
