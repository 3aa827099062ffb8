"""Logits of a checkpoint under any tp x pp layout, for the resharding tests.

`logits_after_resume` runs on every rank of a layout (through tp_harness.run_workers): it builds the
trainer as `neox.train.worker` does (topology, model, engine, data, resume from `latest`), then runs
one fixed batch forward, by hand through the pipeline stages (PipelineEngine has no plain forward),
gathers the vocab-parallel logits over the tensor group, and the rank holding the full logits saves
them. Loaded under the checkpoint's own layout this is DeepSpeed's loader; under another it is
neox's resharding, so the two files compare the two paths on the same weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
import torch.distributed as dist

BATCH, SEQ = 2, 32


def fixed_tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(1234))


def logits_after_resume(rank: int, world: int, run_dir: str, parallelism: Dict[str, int], out_file: str) -> None:
    from neox.config.plan import make_plan
    from neox.config.resources import from_worker_env
    from neox.train import distributed
    from neox.train.worker import Trainer, load_config

    cfg = load_config(str(Path(run_dir) / "config.yaml"))
    for key, value in parallelism.items():
        setattr(cfg.parallelism, key, value)
    cfg.cluster.cpu_procs = world
    cfg.run_dir = run_dir
    info = distributed.init(60)
    trainer = Trainer(cfg, make_plan(cfg, from_worker_env("cpu")), info)
    assert trainer.checkpoints.loaded_tag is not None, "nothing was resumed"
    topo, plan = trainer.topo, trainer.plan
    tokens = fixed_tokens(plan.model.vocab_size)
    module = trainer.engine.module
    module.eval()
    out = {"tag": trainer.checkpoints.loaded_tag, "step": trainer.state.step}
    for dtype in (torch.float32, torch.float64):
        module.to(dtype)  # fp64: the same weights, without the layouts' different summation orders
        logits = _forward(module, tokens, rank, topo, plan, dtype)
        if logits is not None:
            out[str(dtype).split(".")[-1]] = logits
    if "float32" in out and topo.tp_rank == 0 and topo.dp_rank == 0:
        torch.save(out, out_file)
    dist.barrier()


@torch.no_grad()
def _forward(module, tokens, rank, topo, plan, dtype):
    """The full logits on the last stage's ranks (None elsewhere)."""
    if plan.pp == 1:
        out = module(tokens)
    else:  # stage by stage; the next stage's rank has the same dp and tp coordinates
        step = topo.dp_size * topo.tp_size
        x = tokens
        if topo.pp_rank > 0:
            x = torch.empty(BATCH, SEQ, plan.model.d_model, dtype=dtype)
            dist.recv(x, src=rank - step)
        out = module(x)
        if topo.pp_rank < plan.pp - 1:
            dist.send(out.contiguous(), dst=rank + step)
            return None
    if topo.tp_size > 1:
        parts = [torch.empty_like(out) for _ in range(topo.tp_size)]
        dist.all_gather(parts, out.contiguous(), group=topo.tp_group)
        out = torch.cat(parts, dim=-1)
    return out
