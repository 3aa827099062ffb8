"""A resumable batch iterator with Megatron's pretraining-sampler semantics.

Samples are consumed in the dataset's global order. Each step takes the next
micro_batch * dp_size samples; data-parallel rank r gets the r-th slice of micro_batch.
The only state is the global number of consumed samples, so a checkpoint stores that one
integer and a resumed loader continues at exactly the next sample. Reads are memory-mapped
and tiny, so no worker processes are needed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from neox.errors import DataError

if TYPE_CHECKING:
    import torch


class SampleDataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> np.ndarray: ...


class BatchIterator:
    def __init__(self, dataset: SampleDataset, micro_batch: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0) -> None:
        if micro_batch < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(f"bad loader layout micro_batch={micro_batch} dp_rank={dp_rank} "
                            f"dp_size={dp_size}; need micro_batch>=1 and 0<=dp_rank<dp_size")
        if consumed_samples < 0:
            raise DataError(f"consumed_samples={consumed_samples} is negative; pass the "
                            "value saved in the checkpoint")
        self.dataset = dataset
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self._consumed = consumed_samples

    @property
    def consumed_samples(self) -> int:
        """Samples consumed by all data-parallel ranks together (store this in checkpoints)."""
        return self._consumed

    @property
    def step_samples(self) -> int:
        return self.micro_batch * self.dp_size

    def __len__(self) -> int:
        """Micro-batches left (an incomplete last step is dropped)."""
        return (len(self.dataset) - self._consumed) // self.step_samples

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> "torch.Tensor":
        import torch  # here, not at module top: `python -m neox.data.prepare` never needs it

        if self._consumed + self.step_samples > len(self.dataset):
            raise StopIteration
        first = self._consumed + self.dp_rank * self.micro_batch
        batch = np.stack([self.dataset[i] for i in range(first, first + self.micro_batch)])
        self._consumed += self.step_samples
        return torch.from_numpy(batch.astype(np.int64, copy=False))


def make_loader(dataset: SampleDataset, *, micro_batch: int, dp_rank: int, dp_size: int,
                consumed_samples: int = 0) -> BatchIterator:
    return BatchIterator(dataset, micro_batch, dp_rank, dp_size, consumed_samples)
