"""What ranks must agree on, on 2 real processes over gloo (one spawn for both checks):

- a step with a non-finite gradient on one rank only is skipped on every rank
  (SkipNonFiniteAdamW all-reduces the verdict), so the replicas never diverge;
- a stop signal that reaches one rank stops every rank at the same step boundary
  (PreemptionWatcher all-reduces the flag), every step or every k-th call, read at once or one reducing call
  late (what it does on NCCL, so that the read never waits for the GPU's queued work).
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch

from neox.train.guards import SkipNonFiniteAdamW
from neox.train.preempt import PreemptionWatcher
from support.workers import run_workers


def _skips(rank: int) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = SkipNonFiniteAdamW(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    model(torch.ones(3, 4)).sum().backward()
    if rank == 1:
        model.weight.grad[0, 0] = float("nan")  # only rank 1 sees it
    opt.step()
    return {"skip_events": opt.skip_events, "unchanged": torch.equal(model.weight, before)}


def _stops(rank: int, every: int, lagged=None) -> int:
    with PreemptionWatcher(every=every, lagged=lagged) as watcher:
        for call in range(1, 20):
            if rank == 1 and call == 4:
                os.kill(os.getpid(), signal.SIGUSR2)  # only rank 1 is signalled
            if watcher.should_stop():
                return call
    raise AssertionError("never stopped")


def _worker(rank: int, world: int, out_dir: str) -> None:
    result = {"skip": _skips(rank), "stop": {every: _stops(rank, every) for every in (1, 3)},
              "lagged": {every: _stops(rank, every, lagged=True) for every in (1, 3)}}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


def test_ranks_skip_and_stop_together(tmp_path):
    run_workers(_worker, 2, str(tmp_path), timeout=120)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["skip"] == {"skip_events": 1, "unchanged": True}, ranks
        assert r["stop"] == {"1": 4, "3": 6}, ranks  # the signalled step; with every=3, the next 3rd call
        # read one reducing call late (NCCL's default): the signalled call's reduction is read at the next one
        assert r["lagged"] == {"1": 5, "3": 9}, ranks
