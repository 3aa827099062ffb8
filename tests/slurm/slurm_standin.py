"""A stand-in for neox.train.worker.run, with the same contract, for the Slurm tests.

It reads the env vars the Slurm task sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT...), trains a
tiny linear regression data-parallel over gloo, saves a checkpoint every `save_every` steps and when
the PreemptionWatcher says stop (then returns EXIT_REQUEUE), and resumes from the latest checkpoint.
Each step's loss goes to <run_dir>/steps.jsonl (rank 0) with the Slurm restart count, so the tests
can see where a requeued job resumed. The batch of each step is a function of the step only, so an
interrupted run and an uninterrupted one compute the same numbers.
"""
from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from neox.train.preempt import EXIT_REQUEUE, PreemptionWatcher


def _batch(step: int, rank: int, world: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8 * world, 16, generator=g)
    w_true = torch.linspace(-1, 1, 16)
    y = x @ w_true + 0.01 * torch.randn(8 * world, generator=g)
    return x[rank * 8 : (rank + 1) * 8], y[rank * 8 : (rank + 1) * 8]


def _save(ckpt_dir: Path, step: int, model, opt) -> None:
    if dist.get_rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_dir / f".step{step}.tmp"
        torch.save({"step": step, "model": model.state_dict(), "opt": opt.state_dict()}, tmp)
        tmp.rename(ckpt_dir / f"step{step}.pt")
        (ckpt_dir / ".latest.tmp").write_text(str(step))
        (ckpt_dir / ".latest.tmp").rename(ckpt_dir / "latest")
    dist.barrier()


def run(config_path: str) -> int:
    cfg = OmegaConf.load(config_path)
    run_dir = Path(cfg.run_dir)
    steps, save_every = int(cfg.train.steps), int(cfg.train.save_every)
    step_sleep = float(cfg.get("standin", {}).get("step_sleep", 0.0))
    raise_at = cfg.get("standin", {}).get("raise_at", None)
    watcher = PreemptionWatcher()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    ckpt_dir = run_dir / "ckpt"
    step = 0
    if (ckpt_dir / "latest").exists():
        state = torch.load(ckpt_dir / f"step{(ckpt_dir / 'latest').read_text().strip()}.pt")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    log = (run_dir / "steps.jsonl").open("a") if rank == 0 else None
    if log:
        log.write(json.dumps({"event": "start", "step": step, "restart": restart, "world": world}) + "\n")
        log.flush()
    try:
        while step < steps:
            if raise_at is not None and step == int(raise_at) and rank == world - 1:
                raise RuntimeError(f"standin: boom at step {step}")
            x, y = _batch(step, rank, world)
            loss = torch.nn.functional.mse_loss(model(x).squeeze(-1), y)
            opt.zero_grad()
            loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
            opt.step()
            step += 1
            total = loss.detach().clone()
            dist.all_reduce(total)
            if log:
                log.write(json.dumps({"step": step, "loss": total.item() / world, "restart": restart}) + "\n")
                log.flush()
                print(f"standin step {step}/{steps} loss {total.item() / world:.4f}", flush=True)
            time.sleep(step_sleep)
            if step % save_every == 0 or step == steps:
                _save(ckpt_dir, step, model, opt)
            if watcher.should_stop():
                if step % save_every and step != steps:
                    _save(ckpt_dir, step, model, opt)
                if log:
                    log.write(json.dumps({"event": "stop", "step": step, "signal": watcher.signal_name}) + "\n")
                return EXIT_REQUEUE
        if log:
            print(f"standin done: {step} steps", flush=True)
        return 0
    finally:
        watcher.close()
        if log:
            log.close()
        dist.destroy_process_group()
