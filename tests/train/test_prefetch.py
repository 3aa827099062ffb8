"""DeviceBatches (neox.train.prefetch): the same batches in the same order as the loader, one fetched ahead,
and consumed_samples counting only the batches taken (what a checkpoint stores)."""
import numpy as np
import pytest
import torch

from neox.data import make_loader
from neox.train.prefetch import DeviceBatches


class _Samples:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        return np.full(3, i, dtype=np.int32)


def _loader(consumed: int = 0, n: int = 20):
    return make_loader(_Samples(n), micro_batch=2, dp_rank=1, dp_size=2, consumed_samples=consumed)


def test_same_batches_and_resume_point_as_the_loader():
    plain, ahead = _loader(), DeviceBatches(_loader(), torch.device("cpu"))
    for i in range(4):
        got = ahead.take()
        assert torch.equal(got, next(plain)) and got.dtype == torch.int64
        assert ahead.consumed_samples == plain.consumed_samples == 4 * (i + 1)
        ahead.ahead()  # one batch held: not consumed yet
        assert ahead.consumed_samples == plain.consumed_samples
        assert ahead.loader.consumed_samples == plain.consumed_samples + 4
    # a loader resumed at what was saved gives the held batch next
    assert torch.equal(DeviceBatches(_loader(ahead.consumed_samples), torch.device("cpu")).take(), ahead.take())


def test_the_end_of_the_data_is_the_loaders():
    ahead = DeviceBatches(_loader(n=8), torch.device("cpu"))  # two micro-batches of 2 x 2 samples
    ahead.take()
    ahead.ahead()
    ahead.take()
    ahead.ahead()  # nothing left: holds nothing
    assert ahead.consumed_samples == 8
    with pytest.raises(StopIteration):
        ahead.take()
    assert ahead.wait_s > 0
