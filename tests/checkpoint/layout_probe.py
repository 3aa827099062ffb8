"""A checkpoint resumed under another layout, checked from inside the ranks (for the resharding tests).

`resume_and_train` runs on every rank of the new layout (through support.workers.run_workers): it
builds the trainer as `neox.train.worker` does (topology, model, engine, data, resume from `latest`),
then checks, on every rank, that each parameter this rank holds has exactly the fp32 weight and Adam
moments of the checkpoint's full state (`neox.checkpoint.reshard.full_state`, cut by the layout's
tensor shard), and saves the logits of one fixed batch (run by hand through the pipeline stages:
PipelineEngine has no plain forward). With `train`, it then trains on to train.steps, writing
metrics.jsonl as a launched run does. Rank 0's output (the trainer's lines and the checkpoint's) goes
to `<out_file>.log`.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict

import torch
import torch.distributed as dist

BATCH, SEQ = 2, 32


def fixed_tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(1234))


def resume_and_train(rank: int, world: int, run_dir: str, overrides: Dict[str, Any], out_file: str,
                     train: bool) -> None:
    from omegaconf import OmegaConf

    from neox.config.plan import make_plan
    from neox.config.resources import from_worker_env
    from neox.train import distributed
    from neox.train.worker import Trainer, load_config

    cfg = load_config(str(Path(run_dir) / "config.yaml"))
    for key, value in {**overrides, "cluster.cpu_procs": world, "run_dir": run_dir}.items():
        OmegaConf.update(cfg, key, value)
    info = distributed.init(60)
    with open(f"{out_file}.log", "w") as log, contextlib.ExitStack() as quiet:
        if rank == 0:
            quiet.enter_context(contextlib.redirect_stdout(log))
            quiet.enter_context(contextlib.redirect_stderr(log))
        trainer = Trainer(make_plan(cfg, from_worker_env("cpu")), info)
        tag = trainer.checkpoints.loaded_tag
        assert tag is not None, "nothing was resumed"
        _check_state(trainer, Path(run_dir) / "checkpoints" / tag)
        logits = _forward(trainer)
        if logits is not None and trainer.topo.tp_rank == 0 and trainer.topo.dp_rank == 0:
            torch.save({"tag": tag, "step": trainer.state.step, "global_steps": trainer.engine.global_steps,
                        "logits": logits}, out_file)
        dist.barrier()
        if train:
            trainer.fit()


def _check_state(trainer, root: Path) -> None:
    """Every parameter of this rank: weight, fp32 master and both moments exactly the checkpoint's."""
    from neox.checkpoint.reshard import KEYS, full_state

    engine, layout = trainer.engine, trainer.layout
    full, step = full_state(root)
    assert step == trainer.state.step, (step, trainer.state.step)
    zero = layout.parallel.zero_stage
    for local, p in engine.module.named_parameters():
        name = layout.gpt_name(local)
        want = {k: layout.shard(name, v, trainer.topo.tp_rank) for k, v in full[name].items()}
        if zero == 0:
            live = {k: engine.optimizer.state[p][k] for k in KEYS}
            live["param"] = p.detach()
        else:
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            live = {k: safe_get_full_optimizer_state(p, k) for k in KEYS}
            live["param"] = safe_get_full_fp32_param(p)
        assert torch.equal(p.detach(), want["param"]), f"{local} ({name}): the weight is not the checkpoint's"
        for k in ("param", *KEYS):
            assert torch.equal(live[k], want[k]), f"{local} ({name}): {k} is not the checkpoint's"


@torch.no_grad()
def _forward(trainer):
    """The full fp32 logits of the fixed batch on the last stage's ranks (None elsewhere)."""
    module, topo, plan = trainer.engine.module, trainer.topo, trainer.plan
    tokens = fixed_tokens(plan.model.vocab_size)
    module.eval()
    try:
        if plan.pp == 1:
            out = module(tokens)
        else:  # stage by stage; the next stage's rank has the same dp and tp coordinates
            step = topo.dp_size * topo.tp_size
            x = tokens
            if topo.pp_rank > 0:
                x = torch.empty(BATCH, SEQ, plan.model.d_model)
                dist.recv(x, src=dist.get_rank() - step)
            out = module(x)
            if topo.pp_rank < plan.pp - 1:
                dist.send(out.contiguous(), dst=dist.get_rank() + step)
                return None
        if topo.tp_size > 1:
            parts = [torch.empty_like(out) for _ in range(topo.tp_size)]
            dist.all_gather(parts, out.contiguous(), group=topo.tp_group)
            out = torch.cat(parts, dim=-1)
        return out
    finally:
        module.train()
