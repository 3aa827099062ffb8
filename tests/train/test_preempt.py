"""The preemption flag the trainer watches at step boundaries (neox/train/preempt.py), in one
process; that every rank stops at the same step is tests/train/test_agreement.py (2 processes)."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from neox.train.preempt import EXIT_REQUEUE, PreemptionWatcher, default_signals


def test_exit_requeue_is_distinct():
    assert EXIT_REQUEUE not in (0, 1, 2, 130, 137, 143)


def test_signal_sets_flag_only_and_close_restores():
    before = signal.getsignal(signal.SIGUSR2)
    with PreemptionWatcher() as w:
        assert not w.should_stop()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert w.requested and w.signal_name == "SIGUSR2"
        assert w.should_stop() and w.should_stop()  # latched
    assert signal.getsignal(signal.SIGUSR2) == before


def test_chains_to_a_previous_python_handler_not_to_default():
    seen = []
    old = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        with PreemptionWatcher(signals=(signal.SIGUSR2, signal.SIGTERM)) as w:
            os.kill(os.getpid(), signal.SIGTERM)  # SIG_DFL would have killed us; a flag instead
            assert w.requested and seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)


def test_sigterm_is_watched_only_inside_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert default_signals() == (signal.SIGUSR2,)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert default_signals() == (signal.SIGUSR2, signal.SIGTERM)


def test_every_k_only_reduces_on_kth_call():
    with PreemptionWatcher(every=3) as w:
        w.request()
        assert [w.should_stop() for _ in range(4)] == [False, False, True, True]


def test_a_world_of_one_agrees_without_communicating(tmp_path, monkeypatch):
    """One rank has no one to agree with: no collective (on NCCL its read would wait for the GPU's queue)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        def no_collective(*args, **kwargs):
            raise AssertionError("a collective in a world of one rank")

        monkeypatch.setattr(dist, "all_reduce", no_collective)
        with PreemptionWatcher() as w:
            assert not w.should_stop()
            os.kill(os.getpid(), signal.SIGUSR2)
            assert w.should_stop() and w.should_stop()
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_queued_read_of_a_gpu_flag_fills_in_behind_the_queue():
    """The lagged read's copy: queued behind a spin kernel (no wait for it), right once its event is done."""
    flag = torch.ones(1, dtype=torch.int32, device="cuda")
    torch.cuda._sleep(100_000_000)  # >= 50 ms at up to 2 GHz
    host, done = PreemptionWatcher._queued_read(flag * 3)
    assert host.is_pinned() and not done.query()
    done.synchronize()
    assert host.item() == 3
