"""The batch iterator: Megatron sampler order, dp sharding and exact resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from neox.data.loader import make_loader
from neox.errors import DataError


class Numbered:
    """A dataset whose sample i is [i, i, ...], so batches show which samples they hold."""

    def __init__(self, n: int, seq_len: int = 3) -> None:
        self.n, self.seq_len = n, seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        return np.full(self.seq_len + 1, i, dtype=np.int64)


def ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].tolist()


def test_global_order_and_dp_slices() -> None:
    ds = Numbered(50)
    loaders = [make_loader(ds, micro_batch=2, dp_rank=r, dp_size=3) for r in range(3)]
    first = [ids(next(it)) for it in loaders]
    assert first == [[0, 1], [2, 3], [4, 5]]
    second = [ids(next(it)) for it in loaders]
    assert second == [[6, 7], [8, 9], [10, 11]]
    assert all(it.consumed_samples == 12 for it in loaders)
    b = next(loaders[0])
    assert b.dtype == torch.int64 and b.shape == (2, 4)


def test_resume_mid_epoch_continues_exactly() -> None:
    ds = Numbered(100)
    straight = make_loader(ds, micro_batch=4, dp_rank=1, dp_size=2)
    seen = [ids(next(straight)) for _ in range(10)]
    interrupted = make_loader(ds, micro_batch=4, dp_rank=1, dp_size=2)
    for _ in range(4):
        next(interrupted)
    resumed = make_loader(ds, micro_batch=4, dp_rank=1, dp_size=2,
                          consumed_samples=interrupted.consumed_samples)
    assert [ids(next(resumed)) for _ in range(6)] == seen[4:]


def test_stops_at_end() -> None:
    ds = Numbered(10)
    it = make_loader(ds, micro_batch=3, dp_rank=0, dp_size=1)
    assert len(it) == 3
    assert [ids(b) for b in it] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(StopIteration):
        next(it)


def test_bad_layout() -> None:
    with pytest.raises(DataError):
        make_loader(Numbered(10), micro_batch=2, dp_rank=2, dp_size=2)
    with pytest.raises(DataError, match="negative"):
        make_loader(Numbered(10), micro_batch=2, dp_rank=0, dp_size=2, consumed_samples=-2)


def test_resume_with_another_layout() -> None:
    """A checkpoint stores global samples, so a new batch layout resumes at the same sample."""
    ds = Numbered(40)
    old = make_loader(ds, micro_batch=3, dp_rank=0, dp_size=1)
    for _ in range(3):
        next(old)
    new = [make_loader(ds, micro_batch=2, dp_rank=r, dp_size=2,
                       consumed_samples=old.consumed_samples) for r in range(2)]
    assert [ids(next(it)) for it in new] == [[9, 10], [11, 12]]


def test_real_dataset_resume(small_corpus) -> None:
    from neox.data.indexed import IndexedDataset
    from neox.data.sampling import GPTDataset, IndexSpec

    prefix, _ = small_corpus
    data = IndexedDataset(prefix)
    spec = IndexSpec(prefix, "train", (0, len(data)), 8, 64, 3, True)
    spec.build(data)
    ds = GPTDataset(data, spec)
    full = torch.cat(list(make_loader(ds, micro_batch=4, dp_rank=0, dp_size=1)))
    resumed = make_loader(ds, micro_batch=4, dp_rank=0, dp_size=1, consumed_samples=20)
    assert torch.equal(torch.cat(list(resumed)), full[20:])
