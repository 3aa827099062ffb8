"""Shared fixtures for the kernel tests: fresh seeds, poisoned outputs, CPU/CUDA parametrisation."""
import random

import pytest
import torch

from neox.kernels import _backend

CUDA_SKIP = "no CUDA device visible (run the GPU variants on the GPU machine with `pytest -m gpu tests/kernels`)"

# Every test runs on CPU (CI) and, marked `gpu`, on CUDA.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP)]),
]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN, so an element a kernel forgets to write shows up as a failure."""
    monkeypatch.setattr(_backend, "POISON_OUTPUTS", True)


@pytest.fixture
def seed() -> int:
    """Fresh random inputs on every run; the seed is in each failure message to reproduce it."""
    s = random.randrange(2**31)
    torch.manual_seed(s)
    return s


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param
