"""The training log window (neox.train.log_window): the mean loss over steps and data-parallel ranks, the
data wait and the window's time, against plain arithmetic; on a GPU, read after the fact from queued work."""
import time

import pytest
import torch
import torch.distributed as dist

from neox.train.log_window import LogWindow
from support.workers import run_workers


def _two_ranks(rank: int, world: int) -> None:
    window = LogWindow(torch.device("cpu"), None, world)
    losses = [[2.0, 4.0, 9.0], [1.0, 3.0, 5.0]][rank]  # rank means 5 and 3: the dp mean is 4
    for i, loss in enumerate(losses):
        window.add(torch.tensor(loss, dtype=torch.bfloat16), data_wait_s=0.01 * (i + 1))
    time.sleep(0.05)
    closed, following = window.close(grad_norm=torch.tensor(1.5), step=3, lr=0.1)
    mean, seconds, norm = closed.read()
    assert mean == pytest.approx(4.0)
    assert closed.steps == 3 and closed.data_wait_s == pytest.approx(0.06)
    assert 0.05 <= seconds < 5.0 and norm == 1.5 and closed.extras == {"step": 3, "lr": 0.1}
    assert following.losses == [] and following.data_wait_s == 0.0  # the next window starts empty
    following.add(torch.tensor(7.0 + rank), 0.0)
    assert following.close(None)[0].read()[0] == pytest.approx(7.5)  # 7 and 8 over the two ranks
    assert following.close(None)[0].read()[2] != following.close(None)[0].read()[2]  # no grad norm: nan


def test_mean_over_steps_and_ranks():
    run_workers(_two_ranks, 2, timeout=120)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_window_reads_queued_work():
    """close() returns before the GPU has run the window's work; read() then has the values and the GPU time
    between the two windows' end events (a spin kernel of >= 0.1 s queued in between). The first window of a
    kind runs once before: a kernel's first launch loads its module, which waits for the GPU (session 19, on
    an H200: 220 ms for the first stack-and-sum behind a spin, 0.2 ms after)."""
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)  # the trainer's backend
    try:
        device = torch.device("cuda")
        first = LogWindow(device, None, 1)
        first.add(torch.ones((), device=device), 0.0)
        closed_first, window = first.close(None)
        assert closed_first.read()[0] == 1.0
        for spin, check in ((1000, False), (200_000_000, True)):  # warm-up, then >= 0.1 s at up to 2 GHz
            window.add(torch.full((), 3.0, device=device), 0.0)
            torch.cuda._sleep(spin)  # a spin kernel: no allocation, no synchronization
            window.add(torch.full((), 5.0, device=device), 0.0)
            closed, window = window.close(torch.full((), 2.0, device=device))
            assert not check or not closed.done.query()  # queued, not waited for
            mean, seconds, norm = closed.read()
            assert mean == 4.0 and norm == 2.0 and seconds < 5.0
        assert seconds > 0.05
    finally:
        dist.destroy_process_group()
