"""The training loader one micro-batch ahead, each batch already queued to the device.

Between an optimizer step (whose gradient norm is a host sync) and the next forward, the host used to
fetch the next batch (sample, stack, pin) and only then queue its copy and the forward: the GPU waited
for that (on one H200, 6.9 ms of a 1.05 s Pythia-1.4B step, 5.8 of 526 ms at 125M). Here `ahead()`,
called once a micro-batch's forward and backward are queued, does that work while the GPU computes, and
`take()` hands out the batch fetched before. The copy comes from pinned memory, so it is queued behind the
GPU's work instead of waiting for the queue to drain.

`consumed_samples` counts only the batches taken: a checkpoint saved with one batch held ahead resumes at
that batch, as if it had never been fetched.
"""
from __future__ import annotations

import time
from typing import Optional

import torch


def to_device(tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """tokens on `device`, the copy queued; from pinned memory on a GPU (torch's caching host allocator reuses
    it once the copy is done), since from pageable memory the copy would wait for the GPU's queue to drain."""
    if tokens.device == device:
        return tokens
    if device.type == "cuda":
        tokens = tokens.pin_memory()
    return tokens.to(device, non_blocking=True)


class DeviceBatches:
    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device
        self._held: Optional[torch.Tensor] = None
        self.wait_s = 0.0  # host seconds spent fetching batches (the trainer's "data wait")

    @property
    def consumed_samples(self) -> int:
        held = self.loader.step_samples if self._held is not None else 0
        return self.loader.consumed_samples - held

    def _fetch(self) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return to_device(next(self.loader), self.device)
        finally:
            self.wait_s += time.perf_counter() - t0

    def take(self) -> torch.Tensor:
        """The next micro-batch, on the device (or its copy queued); StopIteration when the data ends."""
        if self._held is None:
            return self._fetch()
        tokens, self._held = self._held, None
        return tokens

    def ahead(self) -> None:
        """Fetch the next micro-batch now (the GPU is busy); nothing when one is held or the data ends."""
        if self._held is None:
            try:
                self._held = self._fetch()
            except StopIteration:
                pass
